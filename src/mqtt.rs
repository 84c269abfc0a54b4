//! MQTT ingestion: topic patterns, payload decoding, redelivery detection, the client's
//! options, and the two loops the MQTT source actor (`src/actors/sources/mqtt.rs`) runs.
//!
//! **Delivery.** tidemark subscribes with QoS 1 on a persistent MQTT 5 session and
//! acknowledges by hand: a message's PUBACK is sent only after [`Ingest::accept`] took its
//! event — in embedded mode once the ingest log's group commit made it durable (what an
//! HTTP `202` promises), in Kafka mode once the broker acknowledged it on `kafka.topic`.
//! A message not acknowledged is redelivered by the MQTT broker after a reconnect or a
//! restart, so nothing is lost between the broker and the pipeline.
//!
//! **Redeliveries count once.** A message can arrive twice: tidemark took it but the
//! PUBACK did not reach the broker (connection lost, process killed), or a publisher
//! re-sent it after its own reconnect. Such a copy is always among the last messages
//! received before the interruption: a broker has at most `receive_maximum` messages in
//! flight to tidemark, and a publisher at most its own in-flight window. So the source
//! remembers the identities (sensorId, eventType, timestamp, value) of the last
//! `mqtt.dedup_window` events taken, and a message whose event is among them is
//! acknowledged and counted as a duplicate instead of being ingested again. After a
//! restart the memory is seeded from the ingest log's tail, which holds the events of the
//! previous run. A payload that is a bare number carries no event time (it is stamped
//! on receipt), so its redelivery cannot be recognised: publishers that need
//! exactly-once send the timestamp.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, MqttConfig};
use crate::ingest::{Implied, Ingest, IngestRefusal, ParseLimits, parse_event_with};
use crate::messages::{DeadLetter, Event, MAX_DEAD_LETTER_PAYLOAD, RejectReason, Source, StoreMsg, truncate_payload};
use crate::metrics::{Metrics, RejectLabels, SourceLabels};

/// One level of a topic pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: any one level.
    Any,
    /// `#`: the rest of the topic (last level only).
    Rest,
    SensorId,
    EventType,
}

/// A subscription with the fields its topic levels fill: `sensors/{sensorId}/data`
/// subscribes to `sensors/+/data` and takes `sensorId` from the second level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
    filter: String,
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("a topic pattern must not be empty".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::Any,
                "#" if index + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("{pattern:?}: # must be the last level")),
                "{sensorId}" => Level::SensorId,
                "{eventType}" => Level::EventType,
                other if other.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "{pattern:?}: level {other:?} mixes text with a wildcard or a field; a level is text, +, #, \
                         {{sensorId}} or {{eventType}}"
                    ));
                }
                other => Level::Literal(other.to_string()),
            };
            if levels.contains(&level) && matches!(level, Level::SensorId | Level::EventType) {
                return Err(format!("{pattern:?}: a field may be named once"));
            }
            levels.push(level);
        }
        let filter = levels
            .iter()
            .map(|level| match level {
                Level::Literal(text) => text.as_str(),
                Level::Any | Level::SensorId | Level::EventType => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/");
        Ok(Self { levels, filter })
    }

    /// The MQTT filter subscribed to.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// The fields `topic` fills, or `None` when it does not match.
    pub fn fields<'t>(&self, topic: &'t str) -> Option<Implied<'t>> {
        let mut implied = Implied::default();
        let mut parts = topic.split('/');
        for level in &self.levels {
            if *level == Level::Rest {
                return Some(implied);
            }
            let part = parts.next()?;
            match level {
                Level::Literal(text) if text != part => return None,
                Level::SensorId => implied.sensor_id = Some(part),
                Level::EventType => implied.event_type = Some(part),
                _ => {}
            }
        }
        parts.next().is_none().then_some(implied)
    }
}

/// The configured patterns; a topic takes the fields of the first that matches.
#[derive(Clone, Debug)]
pub struct Topics(Vec<TopicPattern>);

impl Topics {
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        patterns.iter().map(|p| TopicPattern::parse(p)).collect::<Result<Vec<_>, _>>().map(Self)
    }

    pub fn filters(&self) -> Vec<String> {
        self.0.iter().map(|p| p.filter().to_string()).collect()
    }

    pub fn fields<'t>(&self, topic: &'t str) -> Implied<'t> {
        self.0.iter().find_map(|pattern| pattern.fields(topic)).unwrap_or_default()
    }
}

/// Decode one message: the payload is an event object (fields the topic names may be
/// left out) or, when the topic names the sensor and the type, a bare number.
pub fn decode(
    topics: &Topics,
    topic: &str,
    payload: &[u8],
    limits: ParseLimits,
    now_ms: i64,
) -> Result<Event, (RejectReason, String)> {
    parse_event_with(payload, limits, now_ms, topics.fields(topic))
}

/// What identifies an event for redelivery detection.
pub fn identity(event: &Event) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    event.sensor_id.as_str().hash(&mut hasher);
    event.event_type.as_str().hash(&mut hasher);
    event.timestamp_ms.hash(&mut hasher);
    event.value.to_bits().hash(&mut hasher);
    hasher.finish()
}

/// The identities of the last `capacity` events taken, oldest first out.
pub struct RecentEvents {
    order: VecDeque<u64>,
    counts: hashbrown::HashMap<u64, u32, rustc_hash::FxBuildHasher>,
    capacity: usize,
}

impl RecentEvents {
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::with_capacity(capacity.min(1 << 20)),
            counts: hashbrown::HashMap::with_capacity_and_hasher(capacity.min(1 << 20), Default::default()),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.counts.contains_key(&id)
    }

    pub fn insert(&mut self, id: u64) {
        if self.order.len() == self.capacity
            && let Some(old) = self.order.pop_front()
            && let hashbrown::hash_map::Entry::Occupied(mut entry) = self.counts.entry(old)
        {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
        self.order.push_back(id);
        *self.counts.entry(id).or_insert(0) += 1;
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The identities of the events the ingest log holds from the previous run (the last
/// `window` of each partition), so its redeliveries are recognised after a restart.
pub fn seed_from_log(recovered: &[Vec<crate::ingest::log::Recovered>], window: usize) -> Vec<u64> {
    let mut seed = Vec::new();
    for partition in recovered {
        let mut ids: Vec<u64> = Vec::new();
        for entry in partition.iter().rev() {
            if let crate::ingest::log::Recovered::Events(events) = entry {
                ids.extend(events.iter().rev().map(identity));
                if ids.len() >= window {
                    break;
                }
            }
        }
        ids.truncate(window);
        seed.extend(ids.into_iter().rev());
    }
    seed
}

/// Configuration problems of `[mqtt]`, each naming its key.
pub fn config_problems(config: &Config) -> Vec<String> {
    let mqtt = &config.mqtt;
    let mut problems = Vec::new();
    if let Err(error) = Endpoint::parse(&mqtt.url) {
        problems.push(format!("mqtt.url: {error}"));
    }
    if mqtt.client_id.is_empty() || mqtt.client_id.len() > 256 {
        problems.push("mqtt.client_id: 1 to 256 characters, one per instance".into());
    }
    if mqtt.topics.is_empty() {
        problems.push("mqtt.topics: at least one topic pattern".into());
    }
    for pattern in &mqtt.topics {
        if let Err(error) = TopicPattern::parse(pattern) {
            problems.push(format!("mqtt.topics: {error}"));
        }
    }
    if !mqtt.password.is_empty() && mqtt.username.is_empty() {
        problems.push("mqtt.password: set mqtt.username too".into());
    }
    if mqtt.client_cert_file.is_empty() != mqtt.client_key_file.is_empty() {
        problems.push("mqtt.client_cert_file and mqtt.client_key_file: set both or neither".into());
    }
    if mqtt.receive_maximum == 0 {
        problems.push("mqtt.receive_maximum: must be at least 1".into());
    }
    if mqtt.batch_size == 0 {
        problems.push("mqtt.batch_size: must be at least 1".into());
    }
    if mqtt.dedup_window < usize::from(mqtt.receive_maximum) {
        problems.push(format!(
            "mqtt.dedup_window: must be at least mqtt.receive_maximum ({}), or a redelivery could be counted twice",
            mqtt.receive_maximum
        ));
    }
    if mqtt.keep_alive < Duration::from_secs(1) {
        problems.push("mqtt.keep_alive: at least 1s".into());
    }
    if mqtt.reconnect_backoff_initial.is_zero() || mqtt.reconnect_backoff_max < mqtt.reconnect_backoff_initial {
        problems.push("mqtt.reconnect_backoff_initial: above 0 and at most mqtt.reconnect_backoff_max".into());
    }
    if mqtt.forward == crate::config::MqttForward::Kafka && config.kafka.brokers.is_empty() {
        problems.push("mqtt.forward = \"kafka\": set kafka.brokers".into());
    }
    problems
}

/// Host, port and TLS of `mqtt.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|error| format!("{error}; expected mqtt://host:port"))?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => return Err(format!("scheme {other:?}: use mqtt:// or mqtts://")),
        };
        let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or("no host")?.to_string();
        let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(Self { host: host.trim_start_matches('[').trim_end_matches(']').to_string(), port, tls })
    }
}

/// The client's options: MQTT 5, persistent session (clean start off), manual acks.
pub fn options(config: &MqttConfig) -> Result<MqttOptions, String> {
    let endpoint = Endpoint::parse(&config.url).map_err(|error| format!("mqtt.url: {error}"))?;
    let mut options = MqttOptions::new(config.client_id.clone(), endpoint.host.clone(), endpoint.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX)))
        .set_receive_maximum(Some(config.receive_maximum))
        .set_manual_acks(true)
        .set_max_packet_size(Some(1 << 20))
        // Every acknowledgement of the messages in flight fits, so acking never waits
        // for the event loop.
        .set_request_channel_capacity(usize::from(config.receive_maximum) * 2 + 64)
        .set_connection_timeout(10);
    if !config.username.is_empty() {
        options.set_credentials(config.username.clone(), config.password.clone());
    }
    if endpoint.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(
            tls_config(config)?,
        ))));
    }
    Ok(options)
}

fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if config.ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err("mqtt.ca_file: empty, and the system has no CA certificates".into());
        }
    } else {
        let certs = CertificateDer::pem_file_iter(&config.ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| format!("mqtt.ca_file {}: {error}", config.ca_file))?;
        for cert in certs {
            roots.add(cert).map_err(|error| format!("mqtt.ca_file {}: {error}", config.ca_file))?;
        }
        if roots.is_empty() {
            return Err(format!("mqtt.ca_file {}: no certificate in the file", config.ca_file));
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots);
    if config.client_cert_file.is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = CertificateDer::pem_file_iter(&config.client_cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("mqtt.client_cert_file {}: {error}", config.client_cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&config.client_key_file)
        .map_err(|error| format!("mqtt.client_key_file {}: {error}", config.client_key_file))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|error| format!("mqtt.client_cert_file / mqtt.client_key_file: {error}"))
}

/// The connection's state, shared with `/ready`, `/api/status` and `/metrics`.
pub struct MqttShared {
    pub config: MqttConfig,
    pub topics: Topics,
    pub metrics: Arc<Metrics>,
    connected: AtomicBool,
    /// The broker confirmed the subscriptions (SUBACK, or a session that has them).
    subscribed: AtomicBool,
    /// Incremented on every CONNACK: acknowledgements of an earlier connection's
    /// messages are not sent (the broker redelivers those).
    generation: AtomicU64,
    running: AtomicBool,
    received: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    reconnects: AtomicU64,
    in_flight: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Identities of the events the previous run logged (seeded at start-up, taken by
    /// the first ingest loop).
    seed: Mutex<Vec<u64>>,
}

impl MqttShared {
    pub fn new(config: &Config, metrics: Arc<Metrics>, seed: Vec<u64>) -> Result<Self, String> {
        Ok(Self {
            topics: Topics::parse(&config.mqtt.topics)?,
            config: config.mqtt.clone(),
            metrics,
            connected: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            running: AtomicBool::new(false),
            received: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_error: Mutex::new(None),
            seed: Mutex::new(seed),
        })
    }

    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
        if !running {
            self.set_connected(false);
        }
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.metrics.mqtt_connected.set(i64::from(connected));
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn add_in_flight(&self, n: u64) {
        let now = self.in_flight.fetch_add(n, Ordering::Relaxed) + n;
        self.metrics.mqtt_in_flight.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    fn sub_in_flight(&self, n: u64) {
        let now = self.in_flight.fetch_sub(n, Ordering::Relaxed).saturating_sub(n);
        self.metrics.mqtt_in_flight.set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}

impl crate::ingest::SourceStatus for MqttShared {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn owned_partitions(&self) -> Option<Vec<crate::messages::PartitionId>> {
        None
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "url": crate::config::redact_url(&self.config.url),
            "clientId": self.config.client_id,
            "topics": self.topics.filters(),
            "connected": self.is_connected(),
            "subscribed": self.subscribed.load(Ordering::SeqCst),
            "messages": self.received.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "duplicates": self.duplicates.load(Ordering::Relaxed),
            "reconnects": self.reconnects.load(Ordering::Relaxed),
            "inFlight": self.in_flight.load(Ordering::Relaxed),
            "lastError": *self.last_error.lock(),
        })
    }

    fn problems(&self) -> Vec<String> {
        if !self.running.load(Ordering::SeqCst) {
            return vec!["mqtt source: not running (restarting or stopped)".to_string()];
        }
        if self.is_connected() {
            // Connected, but a subscription was refused (the broker's ACL, say).
            return match (self.subscribed.load(Ordering::SeqCst), self.last_error.lock().as_deref()) {
                (false, Some(error)) => vec![format!("mqtt: {error}")],
                _ => Vec::new(),
            };
        }
        vec![format!(
            "mqtt: not connected to {} ({}); reconnecting",
            crate::config::redact_url(&self.config.url),
            self.last_error.lock().as_deref().unwrap_or("connecting")
        )]
    }
}

/// A message with the connection it arrived on.
pub struct Received {
    generation: u64,
    publish: Publish,
}

/// Drives the client's event loop: (re)connects with backoff, subscribes when the
/// broker has no session, and hands publishes to the ingest loop. On `stop` it stops
/// handing publishes over (those arriving later are redelivered next time), keeps the
/// connection up until the ingest loop has acknowledged what it took (`drained`), then
/// disconnects (the session stays at the broker).
pub async fn run_connection(
    shared: Arc<MqttShared>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    to_ingest: mpsc::Sender<Received>,
    mut stop: watch::Receiver<bool>,
    mut drained: watch::Receiver<bool>,
) {
    let mut backoff = shared.config.reconnect_backoff_initial;
    let mut to_ingest = Some(to_ingest);
    let mut disconnecting = false;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed(), if to_ingest.is_some() => {
                to_ingest = None;
                continue;
            }
            _ = drained.changed(), if to_ingest.is_none() && !disconnecting => {
                disconnecting = true;
                if client.try_disconnect().is_err() {
                    break;
                }
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(connack))) => {
                let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
                shared.set_connected(true);
                *shared.last_error.lock() = None;
                backoff = shared.config.reconnect_backoff_initial;
                tracing::info!(
                    url = %crate::config::redact_url(&shared.config.url),
                    session_present = connack.session_present,
                    generation,
                    "mqtt connected"
                );
                shared.subscribed.store(connack.session_present, Ordering::SeqCst);
                if !connack.session_present {
                    let filters = shared.topics.filters().into_iter().map(|topic| {
                        let mut filter = Filter::new(topic, QoS::AtLeastOnce);
                        // Retained messages once, when the subscription is new.
                        filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                        filter
                    });
                    if let Err(error) = client.try_subscribe_many(filters) {
                        tracing::error!(%error, "mqtt: cannot queue the subscription");
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                let generation = shared.generation.load(Ordering::SeqCst);
                // Stopping (no sender): not acknowledged, so the broker keeps it for next time.
                if let Some(sender) = &to_ingest {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    shared.add_in_flight(1);
                    if sender.send(Received { generation, publish }).await.is_err() {
                        shared.sub_in_flight(1);
                        to_ingest = None;
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(suback))) => {
                let mut all = true;
                for (filter, code) in shared.topics.filters().iter().zip(&suback.return_codes) {
                    if !matches!(code, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) {
                        all = false;
                        let message = format!("subscription to {filter:?} refused: {code:?}");
                        tracing::error!(%message, "mqtt");
                        *shared.last_error.lock() = Some(message);
                    }
                }
                shared.subscribed.store(all, Ordering::SeqCst);
            }
            Ok(MqttEvent::Incoming(Packet::Disconnect(disconnect))) => {
                tracing::warn!(reason = ?disconnect.reason_code, "mqtt: the broker disconnected");
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                if disconnecting {
                    break;
                }
                let was_connected = shared.is_connected();
                shared.set_connected(false);
                if was_connected {
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    shared.metrics.mqtt_reconnects.inc();
                }
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "mqtt connection failed");
                *shared.last_error.lock() = Some(error.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed(), if to_ingest.is_some() => { to_ingest = None; }
                }
                if to_ingest.is_none() && !disconnecting {
                    // Stopping while disconnected: nothing to acknowledge or disconnect.
                    break;
                }
                backoff = (backoff * 2).min(shared.config.reconnect_backoff_max);
            }
        }
    }
    shared.set_connected(false);
}

/// Where the ingest loop sends what it cannot ingest.
pub trait RejectSink: Send + Sync {
    fn dead_letters(&self, letters: Vec<DeadLetter>);
}

impl RejectSink for crate::actors::sinks::Sinks {
    fn dead_letters(&self, letters: Vec<DeadLetter>) {
        let count = letters.len();
        if self.send_store(StoreMsg::DeadLetters(letters)).is_err() {
            tracing::error!(count, "store sink unavailable: rejected MQTT messages could not be dead-lettered");
        }
    }
}

/// What the ingest loop hands events to, and how.
#[derive(Clone)]
pub struct IngestSetup {
    pub shared: Arc<MqttShared>,
    pub ingest: Arc<dyn Ingest>,
    pub rejects: Arc<dyn RejectSink>,
    pub limits: ParseLimits,
    /// `mqtt.batch_size`, capped so that one batch always fits a partition's share.
    pub batch_size: usize,
    /// Fault injection (`chaos.mqtt_withhold_acks`, chaos builds only).
    pub withhold_acks: bool,
}

/// Takes received messages in batches, decodes them, skips redeliveries, hands the
/// events to `ingest` (retrying while it refuses) and then acknowledges every message
/// of the batch, in order. Ends when the connection stops handing messages over.
pub async fn run_ingest(
    setup: IngestSetup,
    client: AsyncClient,
    mut from_connection: mpsc::Receiver<Received>,
    drained: watch::Sender<bool>,
) {
    let IngestSetup { shared, ingest, rejects, limits, batch_size, withhold_acks } = setup;
    let batch_size = batch_size.max(1);
    let mut recent = RecentEvents::new(shared.config.dedup_window);
    for id in std::mem::take(&mut *shared.seed.lock()) {
        recent.insert(id);
    }
    let source = SourceLabels { source: "mqtt" };
    let mut batch: Vec<Received> = Vec::with_capacity(batch_size);
    // Taken, not yet handed to the client: acknowledging never waits, or the two loops
    // could wait for each other (the connection blocked on a full channel to this loop,
    // this loop on a full request channel only the connection drains).
    let mut unacked: VecDeque<Received> = VecDeque::new();
    loop {
        acknowledge(&shared, &client, &mut unacked, withhold_acks);
        let received = if unacked.is_empty() {
            from_connection.recv_many(&mut batch, batch_size).await
        } else {
            tokio::select! {
                received = from_connection.recv_many(&mut batch, batch_size) => received,
                () = tokio::time::sleep(Duration::from_millis(1)) => continue,
            }
        };
        if received == 0 {
            break;
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut events = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        let mut duplicates = 0u64;
        for received in &batch {
            let publish = &received.publish;
            let topic = String::from_utf8_lossy(&publish.topic);
            let implied = shared.topics.fields(&topic);
            match parse_event_with(&publish.payload, limits, now_ms, implied) {
                Ok(event) => {
                    let id = identity(&event);
                    if recent.contains(id) {
                        duplicates += 1;
                    } else {
                        // Remembered now: a copy later in this batch is a duplicate too. If
                        // the batch is not taken (shutdown), this memory ends with it.
                        recent.insert(id);
                        events.push(event);
                    }
                }
                Err((reason, message)) => {
                    shared
                        .metrics
                        .events_rejected
                        .get_or_create(&RejectLabels { source: "mqtt", reason: reason.as_str() })
                        .inc();
                    letters.push(DeadLetter {
                        received_at_ms: now_ms,
                        source: Source::Mqtt,
                        reason,
                        error: format!("mqtt topic {topic:?}: {message}"),
                        sensor_id: implied.sensor_id.map(Into::into),
                        event_type: implied.event_type.map(Into::into),
                        event_time_ms: None,
                        partition: None,
                        position: None,
                        payload: truncate_payload(&String::from_utf8_lossy(&publish.payload), MAX_DEAD_LETTER_PAYLOAD),
                    });
                }
            }
        }
        let taken = events.len() as u64;
        let span = receive_span(&batch);
        if !events.is_empty()
            && !tracing::Instrument::instrument(accept_until_taken(&shared, ingest.as_ref(), events), span).await
        {
            // Shutting down: nothing of the batch is acknowledged; the broker redelivers.
            shared.sub_in_flight(batch.len() as u64);
            break;
        }
        let rejected = letters.len() as u64;
        if !letters.is_empty() {
            rejects.dead_letters(letters);
        }
        let metrics = &shared.metrics;
        metrics.events_received.get_or_create(&source).inc_by(batch.len() as u64);
        metrics.events_accepted.get_or_create(&source).inc_by(taken);
        metrics.mqtt_duplicates.inc_by(duplicates);
        shared.accepted.fetch_add(taken, Ordering::Relaxed);
        shared.rejected.fetch_add(rejected, Ordering::Relaxed);
        shared.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        unacked.extend(batch.drain(..));
    }
    // Stopping: the connection keeps polling until `drained`, so these go out.
    let generation = shared.generation.load(Ordering::SeqCst);
    for received in unacked.drain(..) {
        shared.sub_in_flight(1);
        if received.generation == generation && !withhold_acks && client.ack(&received.publish).await.is_err() {
            break;
        }
    }
    let _ = drained.send(true);
}

/// Hand the client every acknowledgement its request channel takes now, in order. An
/// earlier connection's message is not acknowledged: the broker redelivers it on this
/// one, and its packet id may since name another message.
fn acknowledge(shared: &MqttShared, client: &AsyncClient, unacked: &mut VecDeque<Received>, withhold: bool) {
    let generation = shared.generation.load(Ordering::SeqCst);
    while let Some(received) = unacked.front() {
        if received.generation == generation && !withhold && client.try_ack(&received.publish).is_err() {
            break; // full: the connection drains it
        }
        unacked.pop_front();
        shared.sub_in_flight(1);
    }
}

/// With traces on: the span of a received batch, continuing the `traceparent` user
/// properties (MQTT 5) of its messages (the first, linking the others), or starting a
/// trace (sampled by ratio).
fn receive_span(batch: &[Received]) -> tracing::Span {
    if !crate::telemetry::enabled() {
        return tracing::Span::none();
    }
    let mut parents = crate::telemetry::Parents::default();
    for received in batch {
        if let Some(properties) = &received.publish.properties {
            let traceparents = properties.user_properties.iter().filter(|(key, _)| key == crate::kafka::TRACEPARENT);
            parents.extend(traceparents.filter_map(|(_, value)| crate::telemetry::TraceContext::parse(value)));
        }
    }
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "mqtt.receive",
        trace_id = tracing::field::Empty,
        otel.kind = "consumer",
        messaging.system = "mqtt",
        messaging.batch.message_count = batch.len(),
    );
    crate::telemetry::follow(&span, parents.as_slice());
    span
}

/// Hand `events` to the pipeline, waiting out backpressure and outages; `false` when
/// tidemark is shutting down.
async fn accept_until_taken(shared: &MqttShared, ingest: &dyn Ingest, events: Vec<Event>) -> bool {
    let mut wait = Duration::from_millis(50);
    loop {
        match ingest.accept(events.clone()).await {
            Ok(()) => return true,
            Err(IngestRefusal::Closed) => return false,
            Err(IngestRefusal::Backpressure { retry_after, .. }) => {
                shared.metrics.ingest_backpressure.get_or_create(&SourceLabels { source: "mqtt" }).inc();
                tokio::time::sleep(retry_after.min(wait)).await;
            }
            Err(refusal) => {
                tracing::warn!(%refusal, retry_in_ms = wait.as_millis() as u64, "mqtt: events not taken; retrying");
                tokio::time::sleep(wait).await;
            }
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_subscribe_with_wildcards_and_fill_fields() {
        let pattern = TopicPattern::parse("sensors/{sensorId}/{eventType}").unwrap();
        assert_eq!(pattern.filter(), "sensors/+/+");
        let fields = pattern.fields("sensors/t-1/temperature").unwrap();
        assert_eq!(fields.sensor_id, Some("t-1"));
        assert_eq!(fields.event_type, Some("temperature"));
        assert!(pattern.fields("sensors/t-1").is_none());
        assert!(pattern.fields("sensors/t-1/temperature/x").is_none());
        assert!(pattern.fields("other/t-1/temperature").is_none());

        let rest = TopicPattern::parse("plant/+/{sensorId}/#").unwrap();
        assert_eq!(rest.filter(), "plant/+/+/#");
        assert_eq!(rest.fields("plant/a/s9/x/y").unwrap().sensor_id, Some("s9"));

        assert!(TopicPattern::parse("a/#/b").is_err());
        assert!(TopicPattern::parse("a/x{sensorId}").is_err());
        assert!(TopicPattern::parse("{sensorId}/{sensorId}").is_err());
        assert!(TopicPattern::parse("").is_err());
    }

    #[test]
    fn payloads_are_objects_or_bare_numbers() {
        let limits = ParseLimits::default();
        let by_sensor = Topics::parse(&["sensors/{sensorId}/data".to_string()]).unwrap();
        let event =
            decode(&by_sensor, "sensors/s1/data", br#"{"eventType":"temp","value":2.5,"timestamp":1000}"#, limits, 5)
                .unwrap();
        assert_eq!(
            (event.sensor_id.as_str(), event.event_type.as_str(), event.value, event.timestamp_ms),
            ("s1", "temp", 2.5, 1000)
        );
        // The payload may repeat the topic's field, not contradict it.
        assert!(
            decode(&by_sensor, "sensors/s1/data", br#"{"sensorId":"s1","eventType":"t","value":1}"#, limits, 5).is_ok()
        );
        let (reason, message) =
            decode(&by_sensor, "sensors/s1/data", br#"{"sensorId":"s2","eventType":"t","value":1}"#, limits, 5)
                .unwrap_err();
        assert_eq!(reason, RejectReason::InvalidValue);
        assert!(message.contains("sensorId") && message.contains("s2") && message.contains("s1"), "{message}");
        // A bare number needs both fields from the topic.
        let (reason, _) = decode(&by_sensor, "sensors/s1/data", b"21.5", limits, 5).unwrap_err();
        assert_eq!(reason, RejectReason::MissingField);

        let both = Topics::parse(&["sensors/{sensorId}/{eventType}".to_string()]).unwrap();
        let event = decode(&both, "sensors/s1/humidity", b" 41.25\n", limits, 77).unwrap();
        assert_eq!(
            (event.sensor_id.as_str(), event.event_type.as_str(), event.value, event.timestamp_ms),
            ("s1", "humidity", 41.25, 77)
        );
        assert!(decode(&both, "sensors/s1/humidity", b"1e400", limits, 77).is_err());
        assert!(decode(&both, "sensors/s1/humidity", b"12abc", limits, 77).is_err());
        // Topic levels are validated like payload fields.
        assert!(decode(&both, "sensors/s\u{202e}1/humidity", b"1", limits, 77).is_err());
        // A topic no pattern matches: the payload must carry everything.
        let (reason, _) = decode(&both, "elsewhere", br#"{"value":1}"#, limits, 5).unwrap_err();
        assert_eq!(reason, RejectReason::MissingField);
    }

    #[test]
    fn recent_events_forget_the_oldest() {
        let mut recent = RecentEvents::new(3);
        for id in [1, 2, 2] {
            recent.insert(id);
        }
        assert!(recent.contains(1) && recent.contains(2));
        recent.insert(3); // drops 1
        assert!(!recent.contains(1) && recent.contains(3));
        recent.insert(4); // drops one 2; the other stays
        assert!(recent.contains(2));
        recent.insert(5); // drops the last 2
        assert!(!recent.contains(2));
        assert_eq!(recent.len(), 3);
    }

    #[test]
    fn urls_name_host_port_and_tls() {
        assert_eq!(
            Endpoint::parse("mqtt://broker:1884").unwrap(),
            Endpoint { host: "broker".into(), port: 1884, tls: false }
        );
        assert_eq!(
            Endpoint::parse("mqtts://broker").unwrap(),
            Endpoint { host: "broker".into(), port: 8883, tls: true }
        );
        assert!(Endpoint::parse("http://broker").is_err());
        assert!(Endpoint::parse("broker:1883").is_err());
    }
}
