//! `GET /ws`: one WebSocket connection of the live feed ([`crate::live`]).
//!
//! The connection's writer is one loop: it sends what the hub queued for it, answers
//! the client's requests (a `since` replay runs right there, so the hub's messages for
//! the connection wait behind it in its queue and are checked against what the replay
//! sent), pings, and closes the connection when the client falls behind for too long,
//! stops answering, or the server stops. A reader task only forwards what the client
//! sends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::AppContext;
use super::error::ApiError;
use crate::live::{self, Frame, Kind, ParsedRequest, Session};
use crate::metrics::{KindLabels, ReasonLabels};
use crate::store::{ReplayQuery, Since};

/// What the key presented on the upgrade allows (set by the gateway's authorisation).
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    /// `status` needs the admin scope, as `GET /api/status` does.
    pub admin: bool,
}

/// The `access_token` query parameter (browsers cannot set headers on a WebSocket).
pub fn access_token(query: Option<&str>) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query?)
        .ok()?
        .into_iter()
        .find_map(|(name, value)| (name == "access_token").then_some(value))
}

/// Client messages larger than this close the connection (requests are small).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Queued messages written before one flush.
const BATCH: usize = 1024;
/// Rows a replay reads per query.
const REPLAY_PAGE: u32 = 1000;
/// Replayed rows updated this close to (or after) the subscription are remembered, so
/// the live copies of the same versions queued meanwhile are not sent twice. Generous:
/// PostgreSQL stamps rows with its own clock.
const OVERLAP_MS: i64 = 60_000;

/// `GET /ws`.
pub async fn upgrade(
    State(app): State<Arc<AppContext>>,
    grant: Option<Extension<Grant>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !app.config.ws.enabled {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "the live feed is off (ws.enabled = false)")
            .into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                format!("GET /ws is a WebSocket endpoint ({rejection}); connect with a WebSocket client"),
            )
            .into_response();
        }
    };
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|value| value.to_str().ok())
        && !origin_allowed(origin, &headers, &app.config.http.cors_allowed_origins)
    {
        // A page on another site must not read the feed with the user's network access
        // (REST answers are protected by CORS; a WebSocket is not).
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("WebSocket connections from {origin} are not allowed; add it to http.cors_allowed_origins"),
        )
        .into_response();
    }
    let session = match app.sinks.live().connect() {
        Ok(session) => session,
        Err(error) => {
            app.metrics.ws_disconnects.get_or_create(&ReasonLabels { reason: "refused_max_connections" }).inc();
            return ApiError::unavailable("too_many_connections", error.to_string(), 5).into_response();
        }
    };
    let admin = grant.is_some_and(|Extension(grant)| grant.admin);
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| run(app, socket, session, admin))
        .into_response()
}

/// The page's own origin (scheme-agnostic host match), or one of the CORS origins.
fn origin_allowed(origin: &str, headers: &HeaderMap, allowed: &[String]) -> bool {
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    (!host.is_empty() && origin_host.eq_ignore_ascii_case(host)) || allowed.iter().any(|a| a == "*" || a == origin)
}

enum Command {
    Text(Utf8Bytes),
    Binary,
}

/// Why a connection ended (the `reason` of `tidemark_ws_disconnects_total`).
#[derive(Clone, Copy, Debug)]
enum Ended {
    Client,
    Lagged,
    SendTimeout,
    Silent,
    ServerStopping,
    Broken,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Client => "client_closed",
            Ended::Lagged => "lagged",
            Ended::SendTimeout => "send_timeout",
            Ended::Silent => "no_pong",
            Ended::ServerStopping => "server_stopping",
            Ended::Broken => "error",
        }
    }
}

async fn run(app: Arc<AppContext>, socket: WebSocket, session: Session, admin: bool) {
    let (sender, mut receiver) = socket.split();
    let (commands, command_queue) = mpsc::channel(32);
    let heard = Arc::new(parking_lot::Mutex::new(Instant::now()));
    let reader = {
        let heard = Arc::clone(&heard);
        tokio::spawn(async move {
            while let Some(Ok(message)) = receiver.next().await {
                *heard.lock() = Instant::now();
                let command = match message {
                    Message::Text(text) => Command::Text(text),
                    Message::Binary(_) => Command::Binary,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => break,
                };
                if commands.send(command).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut writer = Writer { app, sender, session, admin, heard, overlap: Overlap::default() };
    let ended = writer.serve(command_queue).await;
    reader.abort();
    writer.session.metrics().ws_disconnects.get_or_create(&ReasonLabels { reason: ended.as_str() }).inc();
    tracing::debug!(connection = writer.session.connection.id, reason = ended.as_str(), "WebSocket closed");
}

struct Writer {
    app: Arc<AppContext>,
    sender: futures::stream::SplitSink<WebSocket, Message>,
    session: Session,
    admin: bool,
    heard: Arc<parking_lot::Mutex<Instant>>,
    overlap: Overlap,
}

impl Writer {
    async fn serve(&mut self, mut commands: mpsc::Receiver<Command>) -> Ended {
        let config = self.session.config().clone();
        let mut ping = tokio::time::interval(config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut lagging_since: Option<Instant> = None;
        let outcome: Result<(), Ended> = async {
            loop {
                tokio::select! {
                    biased;
                    _ = self.session.closing.changed() => {
                        self.close(close_code::AWAY, "server stopping; reconnect").await;
                        return Err(Ended::ServerStopping);
                    }
                    command = commands.recv() => match command {
                        None => return Err(Ended::Client),
                        Some(Command::Text(text)) => self.request(text.as_str()).await?,
                        Some(Command::Binary) => {
                            self.error("invalid_request", "send requests as JSON text messages".into()).await?
                        }
                    },
                    frame = self.session.frames.recv() => {
                        let Some(frame) = frame else { return Err(Ended::Broken) };
                        let missed = self.session.connection.take_missed();
                        if missed > 0 {
                            let since = *lagging_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > config.max_lag {
                                let reason = format!(
                                    "fell behind for more than {}",
                                    humantime::format_duration(config.max_lag)
                                );
                                self.close(close_code::POLICY, &reason).await;
                                return Err(Ended::Lagged);
                            }
                            self.send(Message::Text(live::frame_text("lagged", &json!({"missed": missed}))))
                                .await?;
                        } else if self.session.frames.is_empty() {
                            lagging_since = None;
                        }
                        self.deliver(frame).await?;
                    }
                    _ = ping.tick() => {
                        if self.heard.lock().elapsed() > config.ping_interval * 2 {
                            self.close(close_code::AWAY, "no answer to pings").await;
                            return Err(Ended::Silent);
                        }
                        self.send(Message::Ping(Default::default())).await?;
                    }
                }
            }
        }
        .await;
        outcome.err().unwrap_or(Ended::Client)
    }

    /// Send `frame` and whatever else is queued already (up to [`BATCH`]), with one flush.
    async fn deliver(&mut self, frame: Frame) -> Result<(), Ended> {
        let mut batch = Vec::with_capacity(16);
        batch.push(frame);
        while batch.len() < BATCH {
            match self.session.frames.try_recv() {
                Ok(frame) => batch.push(frame),
                Err(_) => break,
            }
        }
        batch.retain(|frame| !self.overlap.already_sent(frame));
        if batch.is_empty() {
            return Ok(());
        }
        self.write(batch.iter().map(|frame| Message::Text(frame.text.clone()))).await?;
        let metrics = self.session.metrics();
        let now_ms = chrono::Utc::now().timestamp_millis();
        for frame in &batch {
            metrics.ws_messages_sent.get_or_create(&KindLabels { kind: frame.kind.as_str() }).inc();
            if let Some(fired_at_ms) = frame.fired_at_ms {
                metrics.ws_fire_to_send.observe((now_ms - fired_at_ms) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), Ended> {
        self.write(std::iter::once(message)).await
    }

    /// Write `messages` with one flush, within `ws.send_timeout`.
    async fn write(&mut self, messages: impl Iterator<Item = Message>) -> Result<(), Ended> {
        let timeout = self.session.config().send_timeout;
        let sender = &mut self.sender;
        let written = tokio::time::timeout(timeout, async {
            for message in messages {
                sender.feed(message).await?;
            }
            sender.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Broken),
            Err(_) => Err(Ended::SendTimeout),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sender.send(Message::Close(Some(frame)))).await;
    }

    async fn error(&mut self, code: &str, message: String) -> Result<(), Ended> {
        let text = live::frame_text("error", &json!({"code": code, "message": message}));
        self.send(Message::Text(text)).await
    }

    async fn request(&mut self, text: &str) -> Result<(), Ended> {
        match live::parse_request(text, self.session.next_subscription_number()) {
            Err(message) => self.error("invalid_request", message).await,
            Ok(ParsedRequest::Unsubscribe(which)) => {
                let ids = self.session.unsubscribe(&which);
                self.send(Message::Text(live::frame_text("unsubscribed", &json!({"ids": ids})))).await
            }
            Ok(ParsedRequest::Subscribe(subscription)) => {
                if subscription.kind == Kind::Status && !self.admin {
                    return self
                        .error("forbidden", "status needs a key with the admin scope, as GET /api/status does".into())
                        .await;
                }
                let registered_ms = chrono::Utc::now().timestamp_millis();
                if let Err(message) = self.session.subscribe(subscription.clone()) {
                    return self.error("invalid_request", message).await;
                }
                self.send(Message::Text(live::frame_text("subscribed", &subscription))).await?;
                match subscription.since() {
                    Some(since) => self.replay(&subscription, since, registered_ms).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Send what the store holds after `since`, oldest first. The subscription is
    /// registered already, so everything committed from now on is queued for this
    /// connection; what was committed before is in the store. The two overlap only in
    /// versions committed while the replay reads, which [`Overlap`] skips.
    async fn replay(
        &mut self,
        subscription: &live::Subscription,
        since: Since,
        registered_ms: i64,
    ) -> Result<(), Ended> {
        let max = self.session.config().max_replay_rows;
        if subscription.kind == Kind::Alerts {
            return self.replay_alerts(subscription, since, registered_ms).await;
        }
        let mut query = ReplayQuery {
            sensor_ids: subscription.filter.sensor_id.clone(),
            event_types: subscription.filter.event_type.clone(),
            anomaly: None,
            severities: subscription.filter.severity.clone(),
            since,
            after: None,
            limit: REPLAY_PAGE,
        };
        let mut sent = 0u64;
        loop {
            let page = match self.app.store.replay(&query).await {
                Ok(page) => page,
                Err(error) => return self.replay_failed(subscription, &error).await,
            };
            for prediction in &page.items {
                self.overlap.remember(
                    subscription.kind,
                    prediction.id,
                    prediction.revision,
                    prediction.updated_at,
                    registered_ms,
                );
                let frame = live::prediction_frame(subscription.kind, prediction, None);
                self.send(Message::Text(frame.text)).await?;
                sent += 1;
            }
            match page.next {
                None => break,
                Some(_) if sent >= max => return self.replay_too_large(subscription, max, "/api/predictions").await,
                Some(cursor) => query.after = Some(cursor),
            }
        }
        let text = live::frame_text("replayed", &json!({"id": subscription.id, "rows": sent}));
        self.send(Message::Text(text)).await
    }
}

impl Writer {
    /// `replay` for alerts: stored alerts after `since` (an alert id, or the time they
    /// started), by id.
    async fn replay_alerts(
        &mut self,
        subscription: &live::Subscription,
        since: Since,
        registered_ms: i64,
    ) -> Result<(), Ended> {
        let max = self.session.config().max_replay_rows;
        let (after_id, from_ms) = match since {
            Since::AfterId(id) => (id, None),
            Since::WindowStart(ms) => (i64::MIN, Some(ms)),
        };
        let mut query = crate::store::AlertQuery {
            sensor_ids: subscription.filter.sensor_id.clone(),
            event_types: subscription.filter.event_type.clone(),
            severities: subscription.filter.severity.clone(),
            from_ms,
            after_id: Some(after_id),
            limit: REPLAY_PAGE,
            ..Default::default()
        };
        let mut sent = 0u64;
        loop {
            let page = match self.app.store.alerts(&query).await {
                Ok(page) => page,
                Err(error) => return self.replay_failed(subscription, &error).await,
            };
            for alert in &page.items {
                self.overlap.remember(Kind::Alerts, alert.id, alert.version(), alert.updated_at, registered_ms);
                self.send(Message::Text(live::alert_frame(alert).text)).await?;
                sent += 1;
            }
            match page.items.last() {
                Some(last) if page.next.is_some() => {
                    if sent >= max {
                        return self.replay_too_large(subscription, max, "/api/alerts").await;
                    }
                    query.after_id = Some(last.id);
                }
                _ => break,
            }
        }
        let text = live::frame_text("replayed", &json!({"id": subscription.id, "rows": sent}));
        self.send(Message::Text(text)).await
    }

    async fn replay_failed(
        &mut self,
        subscription: &live::Subscription,
        error: &crate::store::StoreError,
    ) -> Result<(), Ended> {
        self.session.unsubscribe(&live::Unsubscribe::Id(subscription.id.clone()));
        self.error(
            "store_unavailable",
            format!(
                "subscription {:?} ended: its replay could not read the store ({error}); \
                 subscribe again with the last id you received as since",
                subscription.id
            ),
        )
        .await
    }

    async fn replay_too_large(
        &mut self,
        subscription: &live::Subscription,
        max: u64,
        endpoint: &str,
    ) -> Result<(), Ended> {
        self.session.unsubscribe(&live::Unsubscribe::Id(subscription.id.clone()));
        self.error(
            "replay_too_large",
            format!(
                "subscription {:?} ended: more than {max} stored rows follow since (ws.max_replay_rows); page \
                 through GET {endpoint} and subscribe again with the newest id as since",
                subscription.id
            ),
        )
        .await
    }
}

/// Versions a replay sent that live messages queued meanwhile may repeat.
#[derive(Default)]
struct Overlap {
    sent: rustc_hash::FxHashMap<(Kind, i64), i64>,
    until: Option<Instant>,
}

impl Overlap {
    /// A replay sent version `version` of row `id` (a prediction's revision, an alert's
    /// state), last written at `updated_at`.
    fn remember(&mut self, kind: Kind, id: i64, version: i64, updated_at: i64, registered_ms: i64) {
        if updated_at >= registered_ms - OVERLAP_MS {
            let sent = self.sent.entry((kind, id)).or_insert(version);
            *sent = (*sent).max(version);
            self.until = Some(Instant::now() + Duration::from_millis(OVERLAP_MS as u64));
        }
    }

    /// A live message carrying a version the replay sent (or an older one).
    fn already_sent(&mut self, frame: &Frame) -> bool {
        if self.until.is_some_and(|until| Instant::now() > until) {
            self.sent.clear();
            self.until = None;
        }
        match frame.row {
            Some((id, revision)) => self.sent.get(&(frame.kind, id)).is_some_and(|&sent| revision <= sent),
            None => false,
        }
    }
}
