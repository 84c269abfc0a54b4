//! The live feed behind `GET /ws` and the dashboard.
//!
//! Three producers hand batches to the [`LiveHub`], never waiting:
//! - the store sink, after each commit: the prediction rows the commit inserted or
//!   changed, in the REST shape with their ids (`predictions`, and `alerts` for the
//!   anomalous ones). Publishing after the commit is what lets a subscription replay the
//!   store and then go live with no gap: whatever a replay query cannot see yet is
//!   committed later, so it is published later;
//! - partitions: the events they accept (`events`), only while someone subscribes;
//! - the gateway: the pipeline status every `ws.status_interval` (`status`).
//!
//! The hub's dispatcher serialises each message once and offers it to the bounded queue
//! of every connection with a matching subscription. A full queue drops the message for
//! that connection only and counts it; the connection tells its client how many it
//! missed (`lagged`) and is closed if it stays behind. Nothing here ever waits for a
//! client, so a slow one cannot slow the pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::WsConfig;
use crate::messages::{Event, Severity};
use crate::metrics::{KindLabels, Metrics};
use crate::store::{AlertRow, Prediction, Since, WrittenRow};

/// What a subscription receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every stored window result (first firing and revisions), as `GET /api/predictions`.
    Predictions,
    /// Alerts of the alert rules as they fire and resolve, as `GET /api/alerts`.
    Alerts,
    /// Accepted events, as posted to `POST /api/events`.
    Events,
    /// The pipeline status, as `GET /api/status`.
    Status,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Predictions, Kind::Alerts, Kind::Events, Kind::Status];

    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Predictions => "predictions",
            Kind::Alerts => "alerts",
            Kind::Events => "events",
            Kind::Status => "status",
        }
    }
}

/// What a subscription lets through; an empty list lets everything through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    pub sensor_id: Vec<String>,
    pub event_type: Vec<String>,
    pub severity: Vec<Severity>,
}

impl Filter {
    pub fn matches(&self, sensor_id: &str, event_type: &str, severity: Option<Severity>) -> bool {
        (self.sensor_id.is_empty() || self.sensor_id.iter().any(|id| id == sensor_id))
            && (self.event_type.is_empty() || self.event_type.iter().any(|t| t == event_type))
            && (self.severity.is_empty() || severity.is_some_and(|s| self.severity.contains(&s)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: String,
    pub kind: Kind,
    #[serde(flatten)]
    pub filter: Filter,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<SinceView>,
}

/// `since` as the client gave it: a prediction id (number) or a window start (time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SinceView {
    Id(i64),
    Time(String),
}

impl Subscription {
    pub fn since(&self) -> Option<Since> {
        match self.since.as_ref()? {
            SinceView::Id(id) => Some(Since::AfterId(*id)),
            SinceView::Time(text) => crate::actors::gateway::params::parse_time(text).map(Since::WindowStart),
        }
    }
}

/// A client's request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Subscribe(SubscribeRequest),
    Unsubscribe(UnsubscribeRequest),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscribeRequest {
    pub id: Option<String>,
    pub kind: Kind,
    #[serde(default)]
    pub sensor_id: OneOrMany,
    #[serde(default)]
    pub event_type: OneOrMany,
    #[serde(default)]
    pub severity: OneOrMany,
    pub since: Option<SinceView>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UnsubscribeRequest {
    /// One subscription by its id…
    pub id: Option<String>,
    /// …or every subscription of a kind.
    pub kind: Option<Kind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

const MAX_ID_LEN: usize = 256;
const MAX_FILTER_VALUES: usize = 1000;

/// Parse and check a client's message; the error says what to change.
pub fn parse_request(text: &str, next_id: u64) -> Result<ParsedRequest, String> {
    let request: Request = serde_json::from_str(text).map_err(|error| {
        format!(
            "{error}; send {{\"subscribe\": {{\"kind\": \"predictions\" | \"alerts\" | \"events\" | \"status\", \
             \"sensorId\": [...], \"eventType\": [...], \"severity\": [...], \"since\": <id or time>}}}} \
             or {{\"unsubscribe\": {{\"id\": \"...\"}}}}"
        )
    })?;
    match request {
        Request::Unsubscribe(UnsubscribeRequest { id, kind }) => match (id, kind) {
            (Some(id), None) => Ok(ParsedRequest::Unsubscribe(Unsubscribe::Id(id))),
            (None, Some(kind)) => Ok(ParsedRequest::Unsubscribe(Unsubscribe::Kind(kind))),
            _ => Err("unsubscribe: give either \"id\" (one subscription) or \"kind\" (all of a kind)".into()),
        },
        Request::Subscribe(request) => {
            let id = request.id.unwrap_or_else(|| format!("s{next_id}"));
            if id.is_empty() || id.len() > MAX_ID_LEN {
                return Err(format!("subscribe.id: 1 to {MAX_ID_LEN} characters"));
            }
            let sensor_id = checked_values("sensorId", request.sensor_id.into_vec())?;
            let event_type = checked_values("eventType", request.event_type.into_vec())?;
            let severity = checked_values("severity", request.severity.into_vec())?
                .iter()
                .map(|name| {
                    Severity::parse(name).ok_or_else(|| {
                        format!("subscribe.severity: unknown severity {name:?}; use LOW, MEDIUM, HIGH or CRITICAL")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let kind = request.kind;
            if kind == Kind::Status && !(sensor_id.is_empty() && event_type.is_empty() && severity.is_empty()) {
                return Err("subscribe: status has no filters (sensorId, eventType, severity)".into());
            }
            if kind == Kind::Events && !severity.is_empty() {
                return Err("subscribe.severity: events have no severity; filter predictions or alerts".into());
            }
            if request.since.is_some() && !matches!(kind, Kind::Predictions | Kind::Alerts) {
                return Err(format!(
                    "subscribe.since: only predictions and alerts are stored and can be replayed, not {}",
                    kind.as_str()
                ));
            }
            let subscription =
                Subscription { id, kind, filter: Filter { sensor_id, event_type, severity }, since: request.since };
            if subscription.since.is_some() && subscription.since().is_none() {
                return Err("subscribe.since: a prediction id (a number) or a window start (RFC 3339 text, \
                     or epoch milliseconds as text)"
                    .into());
            }
            Ok(ParsedRequest::Subscribe(subscription))
        }
    }
}

fn checked_values(name: &str, values: Vec<String>) -> Result<Vec<String>, String> {
    if values.len() > MAX_FILTER_VALUES {
        return Err(format!("subscribe.{name}: at most {MAX_FILTER_VALUES} values"));
    }
    if let Some(bad) = values.iter().find(|value| value.is_empty() || value.len() > MAX_ID_LEN) {
        return Err(format!("subscribe.{name}: {bad:?} is empty or longer than {MAX_ID_LEN} bytes"));
    }
    Ok(values)
}

#[derive(Debug)]
pub enum ParsedRequest {
    Subscribe(Subscription),
    Unsubscribe(Unsubscribe),
}

#[derive(Debug)]
pub enum Unsubscribe {
    Id(String),
    Kind(Kind),
}

/// A message serialised once and shared by every connection it goes to.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: Kind,
    pub text: Utf8Bytes,
    /// The row it carries, `(id, revision)` of a prediction or `(id, version)` of an
    /// alert: what a replay may already have sent.
    pub row: Option<(i64, i64)>,
    /// When its window fired (epoch ms), for the fire-to-send latency.
    pub fired_at_ms: Option<i64>,
}

/// `{"kind": <kind>, "data": <data>}`.
pub fn frame_text<T: Serialize>(kind: &str, data: &T) -> Utf8Bytes {
    #[derive(Serialize)]
    struct Tagged<'a, T> {
        kind: &'a str,
        data: &'a T,
    }
    serde_json::to_string(&Tagged { kind, data }).unwrap_or_default().into()
}

/// A prediction's frame for `kind` (predictions or alerts).
pub fn prediction_frame(kind: Kind, prediction: &Prediction, fired_at_ms: Option<i64>) -> Frame {
    Frame {
        kind,
        text: frame_text(kind.as_str(), prediction),
        row: Some((prediction.id, prediction.revision)),
        fired_at_ms,
    }
}

/// An alert's frame: its row, with `(id, version)` (firing 0, resolved 1).
pub fn alert_frame(alert: &AlertRow) -> Frame {
    Frame {
        kind: Kind::Alerts,
        text: frame_text("alerts", alert),
        row: Some((alert.id, alert.version())),
        fired_at_ms: None,
    }
}

/// An event in the shape `POST /api/events` takes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventView<'a> {
    sensor_id: &'a str,
    event_type: &'a str,
    #[serde(serialize_with = "crate::store::ser::millis_rfc3339")]
    timestamp: i64,
    value: f64,
}

/// One WebSocket connection as the hub sees it.
pub struct Connection {
    pub id: u64,
    queue: mpsc::Sender<Frame>,
    missed: AtomicU64,
    subscriptions: RwLock<Vec<Subscription>>,
}

impl Connection {
    /// Messages dropped for this connection since the last call.
    pub fn take_missed(&self) -> u64 {
        self.missed.swap(0, Ordering::Relaxed)
    }

    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.subscriptions.read().clone()
    }

    fn wants(&self, kind: Kind, sensor_id: &str, event_type: &str, severity: Option<Severity>) -> bool {
        self.subscriptions.read().iter().any(|s| s.kind == kind && s.filter.matches(sensor_id, event_type, severity))
    }

    fn subscribed_to(&self, kind: Kind) -> bool {
        self.subscriptions.read().iter().any(|s| s.kind == kind)
    }

    fn offer(&self, frame: &Frame, metrics: &Metrics) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(frame.clone()) {
            self.missed.fetch_add(1, Ordering::Relaxed);
            metrics.ws_messages_dropped.get_or_create(&KindLabels { kind: frame.kind.as_str() }).inc();
        }
    }
}

enum Input {
    Rows(Vec<(Prediction, i64)>),
    Alerts(Vec<AlertRow>),
    Events(Vec<Event>),
    Status(serde_json::Value),
}

/// Batches the producers may have waiting for the dispatcher.
const INPUT_BATCHES: usize = 1024;

pub struct LiveHub {
    config: WsConfig,
    metrics: Arc<Metrics>,
    input: mpsc::Sender<Input>,
    receiver: Mutex<Option<mpsc::Receiver<Input>>>,
    connections: RwLock<Vec<Arc<Connection>>>,
    /// Subscriptions per kind (producers skip work nobody wants).
    subscribers: [AtomicUsize; 4],
    /// Messages dropped at the hub's own input (the dispatcher fell behind), per kind:
    /// every subscriber of the kind is told it may have missed them.
    lost: [AtomicU64; 4],
    next_id: AtomicU64,
    open: AtomicUsize,
    /// Bumped to close every connection (the gateway stops).
    closing: watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0} WebSocket connections are open (ws.max_connections)")]
pub struct TooManyConnections(pub usize);

impl LiveHub {
    pub fn new(config: WsConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let (input, receiver) = mpsc::channel(INPUT_BATCHES);
        Arc::new(Self {
            config,
            metrics,
            input,
            receiver: Mutex::new(Some(receiver)),
            connections: RwLock::new(Vec::new()),
            subscribers: Default::default(),
            lost: Default::default(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            closing: watch::channel(0).0,
        })
    }

    pub fn config(&self) -> &WsConfig {
        &self.config
    }

    /// Start the dispatcher (once; later calls do nothing).
    pub fn start(self: &Arc<Self>) {
        if let Some(receiver) = self.receiver.lock().take() {
            tokio::spawn(Arc::clone(self).dispatch(receiver));
        }
    }

    pub fn wants(&self, kind: Kind) -> bool {
        self.subscribers[kind.index()].load(Ordering::Relaxed) > 0
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The store committed `written` (rows of `results`): publish them.
    pub fn publish_written<'a>(
        &self,
        written: &[WrittenRow],
        result_of: impl Fn(&WrittenRow) -> Option<&'a crate::messages::WindowResult>,
    ) {
        let all = self.wants(Kind::Predictions);
        if !all {
            return;
        }
        let rows: Vec<(Prediction, i64)> = written
            .iter()
            .filter_map(|row| {
                let result = result_of(row)?;
                Some((Prediction::from_written(result, row), result.fired_at_ms))
            })
            .collect();
        if !rows.is_empty() {
            let count = rows.len() as u64;
            if self.input.try_send(Input::Rows(rows)).is_err() {
                self.lost[Kind::Predictions.index()].fetch_add(count, Ordering::Relaxed);
            }
        }
    }

    /// The store committed these alert transitions (`alerts`: what was sent to it, for
    /// the time each one was raised).
    pub fn publish_alerts(&self, rows: &[AlertRow], alerts: &[crate::rules::Alert]) {
        if rows.is_empty() || !self.wants(Kind::Alerts) {
            return;
        }
        let _ = alerts;
        let count = rows.len() as u64;
        if self.input.try_send(Input::Alerts(rows.to_vec())).is_err() {
            self.lost[Kind::Alerts.index()].fetch_add(count, Ordering::Relaxed);
        }
    }

    /// A partition accepted `events`.
    pub fn publish_events(&self, events: &[Event]) {
        if events.is_empty() || !self.wants(Kind::Events) {
            return;
        }
        let count = events.len() as u64;
        if self.input.try_send(Input::Events(events.to_vec())).is_err() {
            self.lost[Kind::Events.index()].fetch_add(count, Ordering::Relaxed);
        }
    }

    pub fn publish_status(&self, status: serde_json::Value) {
        if self.wants(Kind::Status) && self.input.try_send(Input::Status(status)).is_err() {
            self.lost[Kind::Status.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Register a connection; its messages arrive on the returned receiver.
    pub fn connect(self: &Arc<Self>) -> Result<Session, TooManyConnections> {
        let max = self.config.max_connections;
        if self.open.fetch_add(1, Ordering::SeqCst) >= max {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(TooManyConnections(max));
        }
        let (queue, frames) = mpsc::channel(self.config.queue_capacity);
        let connection = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue,
            missed: AtomicU64::new(0),
            subscriptions: RwLock::new(Vec::new()),
        });
        self.connections.write().push(Arc::clone(&connection));
        self.metrics.ws_connections.set(self.open.load(Ordering::SeqCst) as i64);
        Ok(Session { hub: Arc::clone(self), connection, frames, closing: self.closing.subscribe() })
    }

    /// Close every connection (the gateway is stopping); clients reconnect.
    pub fn close_all(&self) {
        self.closing.send_modify(|generation| *generation += 1);
    }

    async fn dispatch(self: Arc<Self>, mut receiver: mpsc::Receiver<Input>) {
        while let Some(input) = receiver.recv().await {
            self.report_lost();
            let connections = self.connections.read().clone();
            match input {
                Input::Rows(rows) => {
                    // Each row serialised once per kind; each connection's subscriptions
                    // read once per batch (a window boundary is a burst of rows).
                    let frames: Vec<_> = rows
                        .iter()
                        .map(|(prediction, fired_at_ms)| {
                            (
                                prediction_frame(Kind::Predictions, prediction, Some(*fired_at_ms)),
                                Severity::parse(&prediction.severity),
                            )
                        })
                        .collect();
                    for connection in &connections {
                        let subscriptions = connection.subscriptions.read();
                        if !subscriptions.iter().any(|s| s.kind == Kind::Predictions) {
                            continue;
                        }
                        for ((prediction, _), (frame, severity)) in rows.iter().zip(&frames) {
                            let matches = subscriptions.iter().any(|s| {
                                s.kind == Kind::Predictions
                                    && s.filter.matches(&prediction.sensor_id, &prediction.event_type, *severity)
                            });
                            if matches {
                                connection.offer(frame, &self.metrics);
                            }
                        }
                    }
                }
                Input::Alerts(rows) => {
                    for alert in &rows {
                        let frame = alert_frame(alert);
                        let severity = Severity::parse(&alert.severity);
                        for connection in &connections {
                            if connection.wants(Kind::Alerts, &alert.sensor_id, &alert.event_type, severity) {
                                connection.offer(&frame, &self.metrics);
                            }
                        }
                    }
                }
                Input::Events(events) => {
                    for event in &events {
                        let mut frame = None;
                        for connection in &connections {
                            if connection.wants(Kind::Events, &event.sensor_id, &event.event_type, None) {
                                let frame: &Frame = frame.get_or_insert_with(|| Frame {
                                    kind: Kind::Events,
                                    text: frame_text(
                                        "events",
                                        &EventView {
                                            sensor_id: &event.sensor_id,
                                            event_type: &event.event_type,
                                            timestamp: event.timestamp_ms,
                                            value: event.value,
                                        },
                                    ),
                                    row: None,
                                    fired_at_ms: None,
                                });
                                connection.offer(frame, &self.metrics);
                            }
                        }
                    }
                }
                Input::Status(status) => {
                    let frame =
                        Frame { kind: Kind::Status, text: frame_text("status", &status), row: None, fired_at_ms: None };
                    for connection in connections.iter().filter(|c| c.subscribed_to(Kind::Status)) {
                        connection.offer(&frame, &self.metrics);
                    }
                }
            }
        }
    }

    /// Tell the subscribers of each kind about messages dropped before the dispatcher.
    fn report_lost(&self) {
        for kind in Kind::ALL {
            let lost = self.lost[kind.index()].swap(0, Ordering::Relaxed);
            if lost == 0 {
                continue;
            }
            for connection in self.connections.read().iter().filter(|c| c.subscribed_to(kind)) {
                connection.missed.fetch_add(lost, Ordering::Relaxed);
                self.metrics.ws_messages_dropped.get_or_create(&KindLabels { kind: kind.as_str() }).inc_by(lost);
            }
        }
    }
}

/// A registered connection: its messages, and its place in the hub until dropped.
pub struct Session {
    hub: Arc<LiveHub>,
    pub connection: Arc<Connection>,
    pub frames: mpsc::Receiver<Frame>,
    /// Changes when the hub closes every connection.
    pub closing: watch::Receiver<u64>,
}

impl Session {
    /// Add a subscription; an id already in use is refused.
    pub fn subscribe(&self, subscription: Subscription) -> Result<(), String> {
        let mut subscriptions = self.connection.subscriptions.write();
        if subscriptions.iter().any(|s| s.id == subscription.id) {
            return Err(format!("subscription {:?} exists; unsubscribe it first or pick another id", subscription.id));
        }
        if subscriptions.len() >= self.hub.config.max_subscriptions {
            return Err(format!(
                "at most {} subscriptions per connection (ws.max_subscriptions)",
                self.hub.config.max_subscriptions
            ));
        }
        self.hub.subscribers[subscription.kind.index()].fetch_add(1, Ordering::Relaxed);
        subscriptions.push(subscription);
        Ok(())
    }

    /// Remove subscriptions; returns the ids removed.
    pub fn unsubscribe(&self, which: &Unsubscribe) -> Vec<String> {
        self.remove(|s| match which {
            Unsubscribe::Id(id) => &s.id == id,
            Unsubscribe::Kind(kind) => s.kind == *kind,
        })
    }

    fn remove(&self, which: impl Fn(&Subscription) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        self.connection.subscriptions.write().retain(|s| {
            let gone = which(s);
            if gone {
                self.hub.subscribers[s.kind.index()].fetch_sub(1, Ordering::Relaxed);
                removed.push(s.id.clone());
            }
            !gone
        });
        removed
    }

    pub fn next_subscription_number(&self) -> u64 {
        self.hub.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn config(&self) -> &WsConfig {
        &self.hub.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.hub.metrics
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.remove(|_| true);
        self.hub.connections.write().retain(|c| c.id != self.connection.id);
        let open = self.hub.open.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        self.hub.metrics.ws_connections.set(open as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(queue_capacity: usize, max_connections: usize) -> WsConfig {
        WsConfig {
            enabled: true,
            max_connections,
            max_subscriptions: 4,
            queue_capacity,
            max_lag: std::time::Duration::from_secs(1),
            send_timeout: std::time::Duration::from_secs(1),
            ping_interval: std::time::Duration::from_secs(1),
            status_interval: std::time::Duration::from_secs(1),
            max_replay_rows: 10,
        }
    }

    fn subscription(text: &str) -> Subscription {
        match parse_request(text, 1) {
            Ok(ParsedRequest::Subscribe(subscription)) => subscription,
            other => panic!("not a subscription: {other:?}"),
        }
    }

    fn alert_row(id: i64, sensor: &str, state: &str) -> AlertRow {
        AlertRow {
            id,
            rule: "anomaly".into(),
            kind: "anomaly".into(),
            sensor_id: sensor.into(),
            event_type: "temperature".into(),
            severity: "HIGH".into(),
            state: state.into(),
            started_at: 60_000,
            resolved_at: (state == "resolved").then_some(70_000),
            message: "anomalous".into(),
            value: Some(1.0),
            window_start: Some(60_000),
            window_end: Some(70_000),
            created_at: 1,
            updated_at: 1,
        }
    }

    fn result(sensor: &str, anomaly: bool) -> crate::messages::WindowResult {
        crate::messages::WindowResult {
            sensor_id: sensor.into(),
            event_type: "temperature".into(),
            window_kind: crate::window::WindowKind::Tumbling,
            window_start_ms: 60_000,
            window_end_ms: 70_000,
            event_count: 3,
            avg_value: 1.0,
            min_value: 0.5,
            max_value: 1.5,
            stddev: 0.1,
            prediction_score: if anomaly { 0.99 } else { 0.1 },
            anomaly,
            severity: if anomaly { Severity::Critical } else { Severity::Low },
            revision: 0,
            explanation: String::new(),
            fired_at_ms: 0,
            supersedes: Vec::new(),
        }
    }

    fn row(id: i64, sensor: &str) -> WrittenRow {
        WrittenRow {
            id,
            sensor_id: sensor.into(),
            event_type: "temperature".into(),
            window_start_ms: 60_000,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[test]
    fn requests_are_checked_and_errors_say_what_to_send() {
        let s = subscription(r#"{"subscribe": {"kind": "alerts", "sensorId": "a", "severity": ["high"]}}"#);
        assert_eq!(s.filter.sensor_id, vec!["a".to_string()]);
        assert_eq!(s.filter.severity, vec![Severity::High]);
        assert_eq!(s.id, "s1");
        let id = subscription(r#"{"subscribe": {"kind": "predictions", "since": 42}}"#);
        assert_eq!(id.since(), Some(Since::AfterId(42)));
        let time = subscription(r#"{"subscribe": {"kind": "predictions", "since": "1970-01-01T00:01:00Z"}}"#);
        assert_eq!(time.since(), Some(Since::WindowStart(60_000)));
        for (bad, says) in [
            (r#"{"subscribe": {"kind": "weather"}}"#, "unknown variant"),
            (r#"{"subscribe": {"kind": "events", "since": 3}}"#, "only predictions and alerts"),
            (r#"{"subscribe": {"kind": "status", "sensorId": "a"}}"#, "status has no filters"),
            (r#"{"subscribe": {"kind": "alerts", "severity": "loud"}}"#, "unknown severity"),
            (r#"{"subscribe": {"kind": "alerts", "since": "yesterday"}}"#, "RFC 3339"),
            (r#"{"unsubscribe": {}}"#, "either"),
            (r#"{"hello": 1}"#, "send {"),
        ] {
            match parse_request(bad, 1) {
                Err(error) => assert!(error.contains(says), "{bad}: {error}"),
                Ok(parsed) => panic!("{bad} was accepted: {parsed:?}"),
            }
        }
    }

    #[tokio::test]
    async fn frames_reach_matching_subscriptions_and_a_full_queue_counts_what_it_missed() {
        let hub = LiveHub::new(config(16, 10), Arc::new(Metrics::new()));
        hub.start();
        let mut alerts_for_a = hub.connect().expect("room");
        alerts_for_a.subscribe(subscription(r#"{"subscribe": {"kind": "alerts", "sensorId": "a"}}"#)).expect("ok");
        let mut everything = hub.connect().expect("room");
        everything.subscribe(subscription(r#"{"subscribe": {"kind": "predictions"}}"#)).expect("ok");
        assert!(hub.wants(Kind::Predictions) && hub.wants(Kind::Alerts) && !hub.wants(Kind::Events));

        let results = [result("a", true), result("a", false), result("b", true)];
        let written = [row(1, "a"), row(2, "a"), row(3, "b")];
        // Two windows of "a" cannot share a start; the lookup goes by id here.
        hub.publish_written(&written, |row| results.get((row.id - 1) as usize));
        hub.publish_alerts(
            &[alert_row(1, "a", "firing"), alert_row(2, "b", "firing"), alert_row(1, "a", "resolved")],
            &[],
        );
        let first = alerts_for_a.frames.recv().await.expect("an alert");
        assert_eq!(first.kind, Kind::Alerts);
        assert_eq!(first.row, Some((1, 0)));
        assert!(
            first.text.as_str().starts_with(r#"{"kind":"alerts","data":{"id":1,"rule":"anomaly""#),
            "{}",
            first.text.as_str()
        );
        let resolved = alerts_for_a.frames.recv().await.expect("its resolution");
        assert_eq!(resolved.row, Some((1, 1)));
        for id in 1..=3 {
            let frame = everything.frames.recv().await.expect("a prediction");
            assert_eq!((frame.kind, frame.row), (Kind::Predictions, Some((id, 0))));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(alerts_for_a.frames.try_recv().is_err(), "b's alert is filtered out");

        // Nobody reads: 16 fit, the rest are counted as missed.
        for id in 0..40 {
            hub.publish_alerts(&[alert_row(id, "a", "firing")], &[]);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(alerts_for_a.connection.take_missed(), 24);
        assert_eq!(alerts_for_a.connection.take_missed(), 0);

        // Limits and cleanup.
        let _third = hub.connect().expect("room");
        drop(everything);
        assert!(!hub.wants(Kind::Predictions));
        assert_eq!(hub.open_connections(), 2);
        let small = LiveHub::new(config(16, 1), Arc::new(Metrics::new()));
        let _only = small.connect().expect("room");
        assert!(small.connect().is_err());
    }
}
