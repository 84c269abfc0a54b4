//! Configuration: embedded `config/default.toml` < `--config FILE` < `TIDEMARK__SECTION__KEY`.
//!
//! Loading never stops at the first problem: unknown keys, values of the wrong type and
//! out-of-range settings are all collected and reported together, so an operator fixes a
//! deployment in one round. Secrets (passwords in URLs) are redacted wherever the
//! configuration is printed or logged.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

/// The defaults compiled into the binary; every key tidemark knows appears here.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment overrides; `__` separates the section from the key.
pub const ENV_PREFIX: &str = "TIDEMARK__";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub pipeline: PipelineConfig,
    pub kafka: KafkaConfig,
    pub scoring: ScoringConfig,
    pub store: StoreConfig,
    pub checkpoint: CheckpointConfig,
    pub supervision: SupervisionConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub dead_letters: DeadLetterConfig,
    pub auth: AuthConfig,
    pub elasticsearch: ElasticsearchConfig,
    pub mqtt: MqttConfig,
    pub ws: WsConfig,
    pub chaos: ChaosConfig,
    /// Alert rules by name (`[rules.<name>]`).
    #[serde(default)]
    pub rules: BTreeMap<String, crate::rules::RuleConfig>,
}

/// The live feed at `GET /ws` and the dashboard at `/` (`[ws]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsConfig {
    pub enabled: bool,
    /// Open WebSocket connections at most; past it the upgrade is answered 503.
    pub max_connections: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Messages queued for one connection; past it messages are dropped for that
    /// connection and it is told how many (`lagged`).
    pub queue_capacity: usize,
    /// A connection that keeps dropping messages for this long is closed.
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    /// A send that does not complete within this closes the connection.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Ping this often; a client silent for two intervals is closed.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How often `status` subscribers get the pipeline status.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Rows a `since` replay sends at most before going live (an older start is an error
    /// telling the client to page with `GET /api/predictions` instead).
    pub max_replay_rows: u64,
}

impl Default for WsConfig {
    /// As in `config/default.toml` (a test holds them equal).
    fn default() -> Self {
        Self {
            enabled: true,
            max_connections: 10_000,
            max_subscriptions: 16,
            queue_capacity: 4096,
            max_lag: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            status_interval: Duration::from_secs(1),
            max_replay_rows: 100_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Dead letters older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// At most this many are kept (the newest).
    pub max_rows: u64,
    /// Rejected events handed to the store and not yet written, at most; past it,
    /// ingestion answers 503 instead of queueing more.
    pub max_pending: usize,
    /// How often retention runs (and sampled-out repeats are summarised).
    #[serde(with = "humantime_serde")]
    pub prune_every: Duration,
    /// Rejected events stored per client, reason and `sample_window`; the rest are
    /// counted and summarised in one dead letter. 0: store every one.
    pub sample_limit: u32,
    #[serde(with = "humantime_serde")]
    pub sample_window: Duration,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `[[auth.api_keys]]` entries: name, sha256 of the key, scopes.
    #[serde(default)]
    pub api_keys: Vec<crate::auth::ApiKeyConfig>,
    /// A TOML file with more `[[api_keys]]` entries (e.g. a mounted Secret); empty: none.
    pub keys_file: String,
    /// JWT bearer tokens (HS256 with a shared secret, or RS256 with a public key).
    pub jwt_hs256_secret_file: String,
    pub jwt_rs256_public_key_file: String,
    pub jwt_issuer: String,
    pub jwt_audience: String,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.api_keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("AuthConfig")
            .field("api_keys", &names)
            .field("keys_file", &self.keys_file)
            .field("jwt_hs256_secret_file", &self.jwt_hs256_secret_file)
            .field("jwt_rs256_public_key_file", &self.jwt_rs256_public_key_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub max_errors_listed: usize,
    /// A connection whose request header has not fully arrived this long after it
    /// started is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request whose body has not fully arrived within this gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Serve a non-loopback address without API keys (behind a proxy that
    /// authenticates, say).
    pub allow_unauthenticated: bool,
    /// Requests per second per client (API key, else IP address); 0: no limit.
    pub rate_limit_per_second: u32,
    /// Burst above the rate; 0: twice the rate.
    pub rate_limit_burst: u32,
    /// PEM certificate chain and private key: serve HTTPS (both or neither).
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// How often the certificate files are checked for a change.
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// Browser origins allowed by CORS; empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// Threads of the HTTP server's own runtime (0: share the pipeline's).
    pub worker_threads: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub max_string_bytes: usize,
    pub mode: IngestMode,
    /// When a `202` is given in embedded mode (see [`Durability`]).
    pub durability: Durability,
    /// Directory of the embedded ingest log; empty: next to the SQLite database
    /// (`<db>.ingest-log`), or `data/ingest-log` with PostgreSQL.
    pub log_dir: String,
    /// Size at which the ingest log starts a new segment file.
    pub log_segment_bytes: u64,
}

/// What a `202` from embedded ingestion promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The events are on disk (`fdatasync`, one per group of requests): they survive a
    /// crash of the process and of the machine.
    Fsync,
    /// The events are written to the operating system: they survive a crash of the
    /// process, not a power loss.
    Os,
    /// The events are in memory only (the replay buffer): a crash loses what no
    /// checkpoint covers yet.
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestMode {
    Embedded,
    Kafka,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub enabled: bool,
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub results_topic: String,
    pub alerts_topic: String,
    pub dlq_topic: String,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// librdkafka settings, passed through. Values may be written as strings, numbers or
    /// booleans (the environment's `6000` arrives as a number).
    #[serde(deserialize_with = "scalar_strings")]
    pub properties: BTreeMap<String, String>,
}

fn scalar_strings<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    let map = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Scalar::Text(text) => text,
                Scalar::Integer(n) => n.to_string(),
                Scalar::Float(x) => x.to_string(),
                Scalar::Flag(flag) => flag.to_string(),
            };
            (key, text)
        })
        .collect())
}

impl KafkaConfig {
    pub fn dlq_topic(&self) -> String {
        if self.dlq_topic.is_empty() { format!("{}.dlq", self.topic) } else { self.dlq_topic.clone() }
    }

    /// The pass-through librdkafka settings with their dotted names (environment
    /// variables cannot hold dots, so `security_protocol` means `security.protocol`).
    pub fn librdkafka_properties(&self) -> impl Iterator<Item = (String, &str)> {
        self.properties.iter().map(|(key, value)| (key.replace('_', "."), value.as_str()))
    }
}

/// Property names whose values are secrets.
fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password") || key.contains("secret") || key.ends_with(".key.pem") || key.contains("token")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("enabled", &self.enabled)
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("results_topic", &self.results_topic)
            .field("alerts_topic", &self.alerts_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("max_in_flight", &self.max_in_flight)
            .field("produce_timeout", &self.produce_timeout)
            .field("properties", &properties)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub partitions: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_buffered_events: usize,
    /// Events stamped further ahead of the ingest clock are rejected (`clock_skew`);
    /// `0s`: no limit.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Open keys one partition holds at most; an event that would open another is
    /// rejected (`key_limit`). 0: no limit.
    pub max_keys_per_partition: usize,
    /// A key without events for this long (ingest clock) and no open window leaves
    /// memory and the checkpoints. `0s`: keys stay.
    #[serde(with = "humantime_serde")]
    pub key_ttl: Duration,
    /// How long an evicted key's tombstone (where its windows stood) is kept.
    #[serde(with = "humantime_serde")]
    pub key_tombstone_ttl: Duration,
    /// Per event type windows other than the default tumbling `window`.
    #[serde(default)]
    pub event_types: BTreeMap<String, EventTypeWindows>,
}

/// `[pipeline.event_types.<type>]`: the windows of one event type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTypeWindows {
    /// `tumbling`, `hopping` or `session`.
    pub window: crate::window::WindowKind,
    /// Tumbling and hopping: the window size (default `pipeline.window`).
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub size: Option<Duration>,
    /// Hopping: the distance between window starts.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub slide: Option<Duration>,
    /// Session: a key's session closes after this long without an event.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub gap: Option<Duration>,
}

impl EventTypeWindows {
    /// What is wrong with these settings, `(key, problem)`.
    fn problems(&self) -> Vec<(&'static str, String)> {
        use crate::window::WindowKind;
        let mut problems = Vec::new();
        let whole_ms = |d: &Duration| d.subsec_nanos().is_multiple_of(1_000_000) && d.as_millis() >= 1;
        for (key, value) in [("size", &self.size), ("slide", &self.slide), ("gap", &self.gap)] {
            if let Some(value) = value
                && (!whole_ms(value) || *value > Duration::from_secs(365 * 86_400))
            {
                problems.push((key, "must be a whole number of milliseconds, between 1ms and 365 days".to_string()));
            }
        }
        match self.window {
            WindowKind::Tumbling => {
                for (key, value) in [("slide", &self.slide), ("gap", &self.gap)] {
                    if value.is_some() {
                        problems.push((key, "applies to hopping and session windows, not tumbling".into()));
                    }
                }
            }
            WindowKind::Hopping => {
                if self.gap.is_some() {
                    problems.push(("gap", "applies to session windows, not hopping".into()));
                }
                match (self.size, self.slide) {
                    (_, None) => problems.push(("slide", "hopping windows need a slide, e.g. slide = \"10s\"".into())),
                    (None, _) => problems.push(("size", "hopping windows need a size, e.g. size = \"10m\"".into())),
                    (Some(size), Some(slide)) if slide > size => {
                        problems.push(("slide", "must not exceed size (windows would leave gaps)".into()))
                    }
                    (Some(size), Some(slide)) => {
                        // Panes of gcd(size, slide): a firing merges size / pane of them.
                        let (size_ms, slide_ms) = (size.as_millis().max(1), slide.as_millis().max(1));
                        let (mut a, mut b) = (size_ms, slide_ms);
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        if size_ms / a > 10_000 {
                            problems.push((
                                "slide",
                                format!(
                                    "size / gcd(size, slide) is {}, above 10000 panes per window; choose a slide that \
                                     divides the size",
                                    size_ms / a
                                ),
                            ));
                        }
                    }
                }
            }
            WindowKind::Session => {
                for (key, value) in [("size", &self.size), ("slide", &self.slide)] {
                    if value.is_some() {
                        problems.push((key, "session windows have no fixed size; they close after `gap`".into()));
                    }
                }
                if self.gap.is_none() {
                    problems.push(("gap", "session windows need a gap, e.g. gap = \"30s\"".into()));
                }
            }
        }
        problems
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    pub model: String,
    /// Per-event-type model overrides: `vibration = "rcf"`.
    #[serde(default)]
    pub event_types: BTreeMap<String, String>,
    pub threshold: f64,
    pub warmup_windows: u32,
    pub ewma_span: f64,
    pub learning_windows: u64,
    pub likelihood_windows: u64,
    pub refractory_windows: u32,
    pub clear_windows: u32,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub batch_size: usize,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// SQLite: past this size the write-ahead log is checkpointed in full and truncated.
    pub sqlite_wal_max_bytes: u64,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("batch_size", &self.batch_size)
            .field("linger", &self.linger)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("sqlite_wal_max_bytes", &self.sqlite_wal_max_bytes)
            .finish()
    }
}

/// Where MQTT messages go once decoded (`mqtt.forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttForward {
    /// The same path as HTTP ingestion (`ingest.mode`): the embedded ingest log, or
    /// `kafka.topic` in Kafka mode.
    Ingest,
    /// Always `kafka.topic` (a bridge: the pipeline reads the topic, here or elsewhere).
    Kafka,
}

/// MQTT ingestion (`[mqtt]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub enabled: bool,
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// The session's name at the broker: one per instance, stable across restarts.
    pub client_id: String,
    /// Topic patterns: MQTT filters where `{sensorId}` and `{eventType}` stand for one
    /// level (subscribed as `+`) whose text fills the field.
    pub topics: Vec<String>,
    pub username: String,
    pub password: String,
    /// PEM CA certificate of the broker (`mqtts://`); empty: the system roots.
    pub ca_file: String,
    /// PEM client certificate and key for brokers that require one (both or neither).
    pub client_cert_file: String,
    pub client_key_file: String,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long the broker keeps the session (subscriptions, unacknowledged messages)
    /// while tidemark is away.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// QoS 1 messages the broker may send before tidemark acknowledges (MQTT 5
    /// Receive Maximum).
    pub receive_maximum: u16,
    /// Messages handed to the pipeline together, at most.
    pub batch_size: usize,
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Recent events remembered to recognise a redelivery; at least `receive_maximum`.
    pub dedup_window: usize,
    pub forward: MqttForward,
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("enabled", &self.enabled)
            .field("url", &redact_url(&self.url))
            .field("client_id", &self.client_id)
            .field("topics", &self.topics)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "***" })
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("keep_alive", &self.keep_alive)
            .field("session_expiry", &self.session_expiry)
            .field("receive_maximum", &self.receive_maximum)
            .field("batch_size", &self.batch_size)
            .field("reconnect_backoff_initial", &self.reconnect_backoff_initial)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("dedup_window", &self.dedup_window)
            .field("forward", &self.forward)
            .finish()
    }
}

/// The Elasticsearch sink and search backend (`[elasticsearch]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchConfig {
    pub enabled: bool,
    /// Nodes, tried in turn (`http://host:9200`, `https://…`).
    pub urls: Vec<String>,
    /// Index (or write alias) of window results; `%Y`, `%m`, `%d`, … make one index per
    /// period of the window start (`tidemark-predictions-%Y.%m.%d`).
    pub index: String,
    /// Name of the index template applied at start-up; empty: none is applied.
    pub template: String,
    pub username: String,
    pub password: String,
    /// An API key as Elasticsearch returns it encoded (base64 of `id:key`).
    pub api_key: String,
    /// PEM file of the CA that signed the cluster's certificate; empty: system roots.
    pub ca_file: String,
    /// Documents per bulk request, at most.
    pub batch_size: usize,
    /// Bytes per bulk request body, at most.
    pub batch_bytes: usize,
    /// Longest a result waits for its bulk request to fill.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of 429s, 5xx and connection errors back off up to this.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    pub number_of_shards: u32,
    pub number_of_replicas: u32,
}

impl fmt::Debug for ElasticsearchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |value: &str| if value.is_empty() { "" } else { "***" };
        f.debug_struct("ElasticsearchConfig")
            .field("enabled", &self.enabled)
            .field("urls", &self.urls.iter().map(|url| redact_url(url)).collect::<Vec<_>>())
            .field("index", &self.index)
            .field("template", &self.template)
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("api_key", &hidden(&self.api_key))
            .field("ca_file", &self.ca_file)
            .field("batch_size", &self.batch_size)
            .field("batch_bytes", &self.batch_bytes)
            .field("linger", &self.linger)
            .field("request_timeout", &self.request_timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub max_events: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    pub max_event_attempts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
}

/// OpenTelemetry traces (`[telemetry]`); off while `otlp_endpoint` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP collector, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318`
    /// (HTTP; `/v1/traces` is appended). Empty: no traces, and no tracing cost.
    pub otlp_endpoint: String,
    /// `grpc` or `http/protobuf`.
    pub otlp_protocol: String,
    /// Fraction of new traces kept (0..=1); a caller's sampled `traceparent` is always
    /// continued and an unsampled one never.
    pub sampling_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// More resource attributes, e.g. `{ "deployment.environment" = "prod" }`.
    pub resource_attributes: BTreeMap<String, String>,
    /// Time allowed for one export.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    /// Off; the other values as in `config/default.toml`.
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_protocol: "grpc".into(),
            sampling_ratio: 0.1,
            service_name: "tidemark".into(),
            resource_attributes: BTreeMap::new(),
            export_timeout: Duration::from_secs(10),
        }
    }
}

impl TelemetryConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    pub partition_panic_probability: f64,
    /// Every event of this sensor panics its partition (a poison event); empty: off.
    pub poison_sensor_id: String,
    pub store_batch_failure_rate: f64,
    /// The Kafka poll thread panics after this many messages, once per process (0: off).
    pub source_panic_after_messages: u64,
    /// The MQTT source takes events but never acknowledges them (the broker redelivers
    /// them to the next run, which must recognise them).
    pub mqtt_withhold_acks: bool,
    pub seed: u64,
}

/// Every problem found while loading, one line each.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

/// Where configuration comes from, highest priority last.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    /// Settings layered right above the embedded defaults (e.g. `tidemark demo`'s short
    /// windows), below the file and the environment.
    pub presets: Vec<(String, toml::Value)>,
    pub file: Option<std::path::PathBuf>,
    /// Read `TIDEMARK__*` from the process environment.
    pub environment: bool,
    /// Extra `section.key = value` overrides (tests, `demo`), applied last.
    pub overrides: Vec<(String, toml::Value)>,
}

impl ConfigSources {
    pub fn from_process(file: Option<std::path::PathBuf>) -> Self {
        Self { presets: Vec::new(), file, environment: true, overrides: Vec::new() }
    }

    pub fn with(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }

    pub fn preset(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.presets.push((key.to_string(), value.into()));
        self
    }
}

impl Config {
    /// The embedded defaults alone.
    pub fn embedded() -> Result<Self, ConfigErrors> {
        Self::load(&ConfigSources::default())
    }

    /// The embedded defaults under the text of a configuration file (what `--config`
    /// reads), without the environment.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigErrors> {
        Self::from_figment(&Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(text)))
    }

    pub fn load(sources: &ConfigSources) -> Result<Self, ConfigErrors> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        for (key, value) in &sources.presets {
            figment = figment.merge(figment::providers::Serialized::global(key, value.clone()));
        }
        if let Some(path) = &sources.file {
            if !path.exists() {
                return Err(ConfigErrors(vec![format!("config file {} does not exist", path.display())]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        if sources.environment {
            figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        }
        for (key, value) in &sources.overrides {
            figment = figment.merge(figment::providers::Serialized::global(key, value.clone()));
        }
        Self::from_figment(&figment)
    }

    /// Every problem at once: unknown keys, values of the wrong type (each replaced by
    /// its default so the rest can still be checked), then the checks of [`Self::validate`].
    /// Each names the key as written in a file (`pipeline.window`) and in the environment
    /// (`TIDEMARK__PIPELINE__WINDOW`), the value, where it came from, and what is valid.
    fn from_figment(figment: &Figment) -> Result<Self, ConfigErrors> {
        use figment::value::Value;
        let mut errors = Vec::new();
        let supplied: Value = match figment.extract() {
            Ok(value) => value,
            // The sources cannot be read at all (a TOML syntax error): nothing to check.
            Err(error) => return Err(ConfigErrors(error.into_iter().map(|e| e.to_string()).collect())),
        };
        let known = known_keys();
        let mut unknown = Vec::new();
        find_unknown_keys(figment, &supplied, &known, "", &mut errors, &mut unknown);
        let mut cleaned = supplied;
        for path in &unknown {
            remove_path(&mut cleaned, path);
        }
        let mut replaced = std::collections::BTreeSet::new();
        let config = loop {
            match Figment::from(figment::providers::Serialized::defaults(&cleaned)).extract::<Config>() {
                Ok(config) => break Some(config),
                Err(error) => {
                    let mut progressed = false;
                    for error in error {
                        let path = error.path.join(".");
                        errors.push(describe_type_error(figment, &path, &error.kind));
                        if replaced.insert(path.clone()) && replace_with_default(&mut cleaned, &known, &path) {
                            progressed = true;
                        }
                    }
                    if !progressed {
                        break None;
                    }
                }
            }
        };
        if let Some(config) = config {
            let mut invalid = Vec::new();
            config.validate(&mut invalid);
            errors.extend(invalid.into_iter().map(|message| with_key_and_value(figment, &message)));
            if errors.is_empty() {
                return Ok(config);
            }
        }
        Err(ConfigErrors(errors))
    }

    fn validate(&self, errors: &mut Vec<String>) {
        let mut check = |ok: bool, message: &str| {
            if !ok {
                errors.push(message.to_string());
            }
        };
        check(self.http.listen.parse::<SocketAddr>().is_ok(), "http.listen: expected an address like 127.0.0.1:8080");
        check(self.http.max_body_bytes >= 1024, "http.max_body_bytes: must be at least 1024");
        check(self.http.max_connections >= 1, "http.max_connections: must be at least 1");
        check(self.dead_letters.max_pending >= 1, "dead_letters.max_pending: must be at least 1");
        check(!self.dead_letters.prune_every.is_zero(), "dead_letters.prune_every: must be above 0");
        check(
            !self.http.header_read_timeout.is_zero() && !self.http.body_read_timeout.is_zero(),
            "http.header_read_timeout and http.body_read_timeout: must be above 0",
        );
        check(
            (1..=4096).contains(&self.ingest.max_string_bytes),
            "ingest.max_string_bytes: must be between 1 and 4096",
        );
        check((1..=1024).contains(&self.pipeline.partitions), "pipeline.partitions: must be between 1 and 1024");
        let telemetry = &self.telemetry;
        check((0.0..=1.0).contains(&telemetry.sampling_ratio), "telemetry.sampling_ratio: must be between 0 and 1");
        check(
            matches!(telemetry.otlp_protocol.as_str(), "grpc" | "http/protobuf"),
            "telemetry.otlp_protocol: must be \"grpc\" or \"http/protobuf\"",
        );
        check(
            telemetry.otlp_endpoint.is_empty()
                || ((telemetry.otlp_endpoint.starts_with("http://")
                    || telemetry.otlp_endpoint.starts_with("https://"))
                    && reqwest::Url::parse(&telemetry.otlp_endpoint).is_ok()),
            "telemetry.otlp_endpoint: must be empty (off) or an http:// or https:// URL",
        );
        check(!telemetry.service_name.is_empty(), "telemetry.service_name: must not be empty");
        check(!telemetry.export_timeout.is_zero(), "telemetry.export_timeout: must be above 0");
        if self.elasticsearch.enabled {
            let es = &self.elasticsearch;
            check(!es.urls.is_empty(), "elasticsearch.urls: at least one URL when elasticsearch.enabled");
            for url in &es.urls {
                check(
                    (url.starts_with("http://") || url.starts_with("https://")) && reqwest::Url::parse(url).is_ok(),
                    "elasticsearch.urls: each must be an http:// or https:// URL",
                );
            }
            check(!es.index.is_empty(), "elasticsearch.index: must not be empty");
            check(
                crate::elasticsearch::IndexName::parse(&es.index).is_ok(),
                "elasticsearch.index: lowercase, no spaces or \\ / * ? \" < > | , #, and only strftime \
                 fields such as %Y %m %d %H",
            );
            check(es.batch_size >= 1, "elasticsearch.batch_size: must be at least 1");
            check(es.batch_bytes >= 4096, "elasticsearch.batch_bytes: must be at least 4096");
            check(
                es.password.is_empty() || !es.username.is_empty(),
                "elasticsearch.password: set elasticsearch.username too",
            );
            check(
                es.api_key.is_empty() || es.username.is_empty(),
                "elasticsearch.api_key and elasticsearch.username: use one of basic auth and an API key",
            );
            check(!es.request_timeout.is_zero(), "elasticsearch.request_timeout: must be above 0");
        }
        for origin in &self.http.cors_allowed_origins {
            check(
                origin == "*"
                    || ((origin.starts_with("http://") || origin.starts_with("https://"))
                        && !origin.ends_with('/')
                        && http::HeaderValue::from_str(origin).is_ok()),
                "http.cors_allowed_origins: each must be \"*\" or an origin such as https://grafana.example.com \
                 (scheme and host, no path)",
            );
        }
        check(
            self.pipeline.key_ttl.is_zero() || self.pipeline.key_ttl > self.pipeline.idle_timeout,
            "pipeline.key_ttl: must be 0s (keys stay) or longer than pipeline.idle_timeout",
        );
        check(
            self.pipeline.window.as_millis() >= 1
                && self.pipeline.window <= Duration::from_secs(365 * 86_400)
                && self.pipeline.window.subsec_nanos().is_multiple_of(1_000_000),
            "pipeline.window: must be a whole number of milliseconds, between 1ms and 365 days",
        );
        check(
            self.pipeline.max_out_of_orderness.subsec_nanos().is_multiple_of(1_000_000),
            "pipeline.max_out_of_orderness: must be a whole number of milliseconds",
        );
        check(
            self.pipeline.allowed_lateness.subsec_nanos().is_multiple_of(1_000_000),
            "pipeline.allowed_lateness: must be a whole number of milliseconds",
        );
        check(self.pipeline.idle_timeout.as_millis() >= 1, "pipeline.idle_timeout: must be at least 1ms");
        for (event_type, windows) in &self.pipeline.event_types {
            for (key, problem) in windows.problems() {
                check(false, &format!("pipeline.event_types.{event_type}.{key}: {problem}"));
            }
        }
        check(
            self.pipeline.max_buffered_events >= self.pipeline.partitions as usize * 16,
            "pipeline.max_buffered_events: must allow at least 16 events per partition",
        );
        check(
            !self.kafka.enabled && self.ingest.mode == IngestMode::Embedded
                || !self.kafka.brokers.trim().is_empty() && !self.kafka.topic.trim().is_empty(),
            "kafka.brokers and kafka.topic: must be set when kafka.enabled or ingest.mode = \"kafka\"",
        );
        let share = crate::router::PartitionRouter::share(self.pipeline.max_buffered_events, self.pipeline.partitions);
        check(
            self.kafka.max_in_flight <= share,
            &format!(
                "kafka.max_in_flight ({}) exceeds a partition's share of pipeline.max_buffered_events ({} / {} \
                 partitions = {share}): the in-flight bound must pause a partition before its buffer is full; set \
                 kafka.max_in_flight to at most {share}, or 0 for half the share",
                self.kafka.max_in_flight, self.pipeline.max_buffered_events, self.pipeline.partitions
            ),
        );
        check(
            !self.kafka.enabled || self.ingest.mode == IngestMode::Kafka,
            "ingest.mode: must be \"kafka\" when kafka.enabled (HTTP events then go through the topic)",
        );
        check(
            crate::scoring::MODELS.contains(&self.scoring.model.as_str()),
            &format!(
                "scoring.model: unknown model {:?}, expected one of {:?}",
                self.scoring.model,
                crate::scoring::MODELS
            ),
        );
        for (event_type, model) in &self.scoring.event_types {
            check(
                crate::scoring::MODELS.contains(&model.as_str()),
                &format!(
                    "scoring.event_types.{event_type}: unknown model {model:?}, expected one of {:?}",
                    crate::scoring::MODELS
                ),
            );
        }
        check(self.scoring.threshold > 0.0 && self.scoring.threshold <= 1.0, "scoring.threshold: must be in (0, 1]");
        check(self.scoring.ewma_span >= 1.0, "scoring.ewma_span: must be at least 1");
        check(
            self.store.url.starts_with("sqlite:")
                || self.store.url.starts_with("postgres://")
                || self.store.url.starts_with("postgresql://"),
            "store.url: expected sqlite://PATH or postgres://USER@HOST/DB",
        );
        check((1..=10_000).contains(&self.store.batch_size), "store.batch_size: must be between 1 and 10000");
        check(self.store.max_connections >= 1, "store.max_connections: must be at least 1");
        check(self.checkpoint.interval.as_millis() >= 10, "checkpoint.interval: must be at least 10ms");
        check(
            self.supervision.backoff_initial <= self.supervision.backoff_max,
            "supervision.backoff_initial: must not exceed supervision.backoff_max",
        );
        check(self.supervision.max_event_attempts >= 1, "supervision.max_event_attempts: must be at least 1");
        check(matches!(self.log.format.as_str(), "text" | "json"), "log.format: expected \"text\" or \"json\"");
        check(
            (0.0..=1.0).contains(&self.chaos.partition_panic_probability),
            "chaos.partition_panic_probability: must be in [0, 1]",
        );
        check(
            (0.0..=1.0).contains(&self.chaos.store_batch_failure_rate),
            "chaos.store_batch_failure_rate: must be in [0, 1]",
        );
        let ws = &self.ws;
        check(ws.max_connections >= 1, "ws.max_connections: must be at least 1");
        check(ws.max_subscriptions >= 1, "ws.max_subscriptions: must be at least 1");
        check(ws.queue_capacity >= 16, "ws.queue_capacity: must be at least 16");
        check(
            !ws.max_lag.is_zero() && !ws.send_timeout.is_zero() && !ws.ping_interval.is_zero(),
            "ws.max_lag, ws.send_timeout and ws.ping_interval: must be above 0",
        );
        check(!ws.status_interval.is_zero(), "ws.status_interval: must be above 0");
        for (name, rule) in &self.rules {
            for (key, problem) in rule.problems() {
                check(false, &format!("rules.{name}.{key}: {problem}"));
            }
        }
        if self.mqtt.enabled {
            errors.extend(crate::mqtt::config_problems(self));
        }
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        // Effective values where the default is derived from other settings.
        shown.kafka.dlq_topic = self.kafka.dlq_topic();
        shown.ingest.log_dir = self.ingest_log_dir().display().to_string();
        shown.store.url = redact_url(&shown.store.url);
        shown.elasticsearch.urls = shown.elasticsearch.urls.iter().map(|url| redact_url(url)).collect();
        shown.mqtt.url = redact_url(&shown.mqtt.url);
        for secret in [&mut shown.elasticsearch.password, &mut shown.elasticsearch.api_key, &mut shown.mqtt.password] {
            if !secret.is_empty() {
                *secret = "***".into();
            }
        }
        for (key, value) in shown.kafka.properties.iter_mut() {
            if is_secret_property(key) {
                *value = "***".into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // Validated in `validate`; the fallback only guards against misuse of a hand-built Config.
        self.http.listen.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }
}

/// Tables whose keys are names the user chooses although the defaults fill them.
const OPEN_MAPS: &[&str] = &["rules"];

/// Every key the embedded defaults define, as a tree. Empty tables are open maps.
fn known_keys() -> figment::value::Value {
    Figment::from(Toml::string(DEFAULT_TOML))
        .extract()
        .unwrap_or_else(|_| figment::value::Value::from(BTreeMap::<String, String>::new()))
}

fn find_unknown_keys(
    figment: &Figment,
    supplied: &figment::value::Value,
    known: &figment::value::Value,
    prefix: &str,
    errors: &mut Vec<String>,
    unknown: &mut Vec<String>,
) {
    use figment::value::Value;
    let (Value::Dict(_, supplied), Value::Dict(_, known)) = (supplied, known) else {
        return;
    };
    if (known.is_empty() && !prefix.is_empty()) || OPEN_MAPS.contains(&prefix) {
        return; // an open map: any key is allowed
    }
    for (key, value) in supplied {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match known.get(key) {
            Some(known_value) => find_unknown_keys(figment, value, known_value, &path, errors, unknown),
            None => {
                let section = prefix.split('.').next().unwrap_or_default();
                let valid: Vec<&str> = known.keys().map(String::as_str).collect();
                let what = if prefix.is_empty() { "sections".to_string() } else { format!("keys of [{section}]") };
                errors.push(format!(
                    "{}: unknown key{}; the {what} are: {}",
                    key_names(&path),
                    origin(figment, &path),
                    valid.join(", ")
                ));
                unknown.push(path);
            }
        }
    }
}

/// A key as a file writes it and as an environment variable: `pipeline.window
/// (TIDEMARK__PIPELINE__WINDOW)`.
fn key_names(path: &str) -> String {
    format!("{path} ({ENV_PREFIX}{})", path.replace('.', "__").to_uppercase())
}

/// Where a key's value came from: ` (from /etc/tidemark.toml)`, ` (from the environment)`.
fn origin(figment: &Figment, path: &str) -> String {
    use figment::Source;
    match figment.find_metadata(path) {
        Some(metadata) if metadata.name.contains("environment") => " (from the environment)".to_string(),
        Some(metadata) => match &metadata.source {
            Some(Source::File(file)) => format!(" (from {})", file.display()),
            Some(Source::Custom(name)) => format!(" (from {name})"),
            // Set by the program itself (`tidemark demo`'s presets, tests).
            _ => String::new(),
        },
        None => String::new(),
    }
}

/// The value at `path` as it was written, in TOML-like notation.
fn supplied_value(figment: &Figment, path: &str) -> Option<String> {
    let value = figment.find_value(path).ok()?;
    Some(serde_json::to_string(&value).unwrap_or_else(|_| "?".into()))
}

/// A value that does not have the key's type.
fn describe_type_error(figment: &Figment, path: &str, kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let value = supplied_value(figment, path).map(|value| format!(" = {value}")).unwrap_or_default();
    let expected = match kind {
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
            let hint =
                if expected.contains("duration") { " such as \"250ms\", \"5s\", \"2m\", \"1h\", \"7d\"" } else { "" };
            format!("expected {expected}{hint}")
        }
        Kind::MissingField(field) => format!("missing key `{field}`"),
        other => other.to_string(),
    };
    format!("{}{value}{}: {expected}", key_names(path), origin(figment, path))
}

/// A check's message `key: what is valid`, with the key's names, value and origin.
fn with_key_and_value(figment: &Figment, message: &str) -> String {
    let Some((keys, rest)) = message.split_once(": ") else {
        return message.to_string();
    };
    let path = keys.split([' ', ',']).next().unwrap_or_default();
    if path.is_empty() || !path.contains('.') || figment.find_value(path).is_err() || keys.contains(' ') {
        return message.to_string();
    }
    let value = supplied_value(figment, path).map(|value| format!(" = {value}")).unwrap_or_default();
    format!("{}{value}{}: {rest}", key_names(path), origin(figment, path))
}

fn remove_path(value: &mut figment::value::Value, path: &str) {
    use figment::value::Value;
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (Some(parent), last),
        None => (None, path),
    };
    let target = match parent {
        Some(parent) => value_at_mut(value, parent),
        None => Some(value),
    };
    if let Some(Value::Dict(_, dict)) = target {
        dict.remove(last);
    }
}

fn value_at_mut<'a>(value: &'a mut figment::value::Value, path: &str) -> Option<&'a mut figment::value::Value> {
    use figment::value::Value;
    let mut current = value;
    for part in path.split('.') {
        current = match current {
            Value::Dict(_, dict) => dict.get_mut(part)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Put the embedded default back at `path` (or drop the key when there is none);
/// whether anything changed.
fn replace_with_default(value: &mut figment::value::Value, known: &figment::value::Value, path: &str) -> bool {
    let mut known = known.clone();
    let default = value_at_mut(&mut known, path).cloned();
    match (default, value_at_mut(value, path)) {
        (Some(default), Some(slot)) => {
            *slot = default;
            true
        }
        (None, Some(_)) => {
            remove_path(value, path);
            true
        }
        (_, None) => false,
    }
}

/// Replace the password of a `scheme://user:password@host/...` URL with `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = redact_user_info(url);
    // Passwords may also travel as a query parameter.
    if let Some(index) = out.find("password=") {
        let value_start = index + "password=".len();
        let value_end = out[value_start..].find('&').map(|offset| value_start + offset).unwrap_or(out.len());
        out.replace_range(value_start..value_end, "***");
    }
    out
}

fn redact_user_info(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user_info = &authority[..at];
    let user = match user_info.find(':') {
        Some(colon) => format!("{}:***", &user_info[..colon]),
        None => user_info.to_string(),
    };
    format!("{}{user}{}{}", &url[..scheme_end + 3], &authority[at..], &rest[authority_end..])
}

/// Milliseconds of a duration, saturating.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Config {
    /// Where the embedded ingest log lives (see [`IngestConfig::log_dir`]).
    pub fn ingest_log_dir(&self) -> std::path::PathBuf {
        if !self.ingest.log_dir.is_empty() {
            return std::path::PathBuf::from(&self.ingest.log_dir);
        }
        match sqlite_path(&self.store.url) {
            Some(db) => {
                let mut name = db.as_os_str().to_os_string();
                name.push(".ingest-log");
                std::path::PathBuf::from(name)
            }
            _ => std::path::PathBuf::from("data/ingest-log"),
        }
    }
}

/// A path-like view of the sqlite URL, for creating its directory.
pub fn sqlite_path(url: &str) -> Option<&Path> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" { None } else { Some(Path::new(path)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load() {
        let config = Config::embedded().expect("defaults are valid");
        assert_eq!(config.pipeline.window, Duration::from_secs(30));
        assert_eq!(config.pipeline.max_out_of_orderness, Duration::from_secs(5));
        assert_eq!(config.http.listen, "127.0.0.1:8080");
        assert_eq!(config.store.url, "sqlite://data/tidemark.db");
    }

    #[test]
    fn overrides_win_and_durations_parse() {
        let sources =
            ConfigSources::default().with("pipeline.window", "2s").with("pipeline.max_out_of_orderness", "500ms");
        let config = Config::load(&sources).expect("valid");
        assert_eq!(config.pipeline.window, Duration::from_secs(2));
        assert_eq!(config.pipeline.max_out_of_orderness, Duration::from_millis(500));
    }

    #[test]
    fn every_error_is_listed() {
        let sources = ConfigSources::default()
            .with("pipeline.windw", "2s")
            .with("pipeline.partitions", 0)
            .with("scoring.threshold", 3.0)
            .with("store.linger", "soon")
            .with("nosuch.key", 1);
        let errors = Config::load(&sources).expect_err("invalid").0;
        let text = errors.join("\n");
        assert!(text.contains("pipeline.windw"), "{text}");
        assert!(text.contains("nosuch"), "{text}");
        assert!(text.contains("linger"), "{text}");
        assert!(errors.len() >= 3, "{text}");
    }

    #[test]
    fn semantic_errors_are_all_listed() {
        let sources = ConfigSources::default()
            .with("pipeline.partitions", 0)
            .with("scoring.threshold", 3.0)
            .with("log.format", "xml");
        let errors = Config::load(&sources).expect_err("invalid").0;
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn kafka_properties_pass_through_and_secrets_are_redacted() {
        let config = Config::load(
            &ConfigSources::default()
                .with("kafka.properties.security_protocol", "SASL_SSL")
                .with("kafka.properties.session_timeout_ms", 6000)
                .with("kafka.properties.sasl_password", "hunter2"),
        )
        .expect("valid");
        let properties: Vec<(String, &str)> = config.kafka.librdkafka_properties().collect();
        assert!(properties.contains(&("security.protocol".to_string(), "SASL_SSL")));
        assert!(properties.contains(&("session.timeout.ms".to_string(), "6000")));
        assert!(!config.to_redacted_toml().contains("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(config.kafka.dlq_topic(), "sensor-events.dlq");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/tidemark?sslmode=require"),
            "postgres://app:***@db:5432/tidemark?sslmode=require"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(
            redact_url("postgres://db/tidemark?user=a&password=b&x=1"),
            "postgres://db/tidemark?user=a&password=***&x=1"
        );
        let config = Config::load(&ConfigSources::default().with("store.url", "postgres://app:s3cret@db/tidemark"))
            .expect("valid");
        assert!(!config.to_redacted_toml().contains("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));
        for (key, secret) in [("elasticsearch.password", "hunter2"), ("elasticsearch.api_key", "c2VjcmV0LWtleQ==")] {
            let mut sources = ConfigSources::default()
                .with("elasticsearch.enabled", true)
                .with("elasticsearch.urls", vec!["https://elastic:urlpass@es:9200"])
                .with(key, secret);
            if key.ends_with("password") {
                sources = sources.with("elasticsearch.username", "elastic");
            }
            let config = Config::load(&sources).expect("valid");
            for shown in [config.to_redacted_toml(), format!("{config:?}")] {
                assert!(!shown.contains(secret) && !shown.contains("urlpass"), "{key} shown: {shown}");
            }
        }
    }

    #[test]
    fn ws_defaults_match_the_default_file() {
        let config = Config::load(&ConfigSources::default()).expect("defaults load");
        assert_eq!(config.ws, WsConfig::default());
        assert_eq!(config.telemetry, TelemetryConfig::default());
    }

    #[test]
    fn mqtt_settings_are_checked_and_its_password_redacted() {
        let sources = ConfigSources::default()
            .with("mqtt.enabled", true)
            .with("mqtt.url", "mqtts://device:urlpass@broker:8883")
            .with("mqtt.username", "device")
            .with("mqtt.password", "hunter2");
        let config = Config::load(&sources).expect("valid");
        for shown in [config.to_redacted_toml(), format!("{config:?}")] {
            assert!(!shown.contains("hunter2") && !shown.contains("urlpass"), "shown: {shown}");
        }
        let errors = Config::load(
            &ConfigSources::default()
                .with("mqtt.enabled", true)
                .with("mqtt.url", "http://broker")
                .with("mqtt.topics", vec!["sensors/#/data", "ok/{sensorId}"])
                .with("mqtt.client_cert_file", "/tmp/cert.pem")
                .with("mqtt.receive_maximum", 100)
                .with("mqtt.dedup_window", 10),
        )
        .expect_err("invalid")
        .to_string();
        for expected in ["mqtt.url", "\"sensors/#/data\": # must be", "mqtt.client_key_file", "mqtt.dedup_window"] {
            assert!(errors.contains(expected), "{expected} not in {errors}");
        }
        assert!(!errors.contains("\"ok/{sensorId}\": "), "a valid pattern is not reported: {errors}");
    }
}
