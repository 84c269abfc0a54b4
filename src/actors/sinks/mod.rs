//! Sinks: where window results, dead letters and checkpoints go.
//!
//! [`Sinks`] is the routing table of the sink actors (owned by the sink supervisor, read
//! by partitions and the gateway) plus the in-process live feed.

pub mod elasticsearch;
pub mod file;
pub mod kafka;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use ractor::ActorRef;
use serde::Serialize;

use crate::live::LiveHub;
use crate::messages::{CheckpointData, PartitionId, Position, StoreMsg, WindowResult};

/// Window results waiting for a sink's next write, at most one per window: a later
/// revision replaces an earlier one (one row may not be upserted twice in a statement,
/// and a bulk request need not carry a superseded document).
#[derive(Default)]
pub struct PendingResults {
    results: Vec<WindowResult>,
    index: rustc_hash::FxHashMap<(compact_str::CompactString, compact_str::CompactString, i64), usize>,
    /// The traces of the batches these results came from (empty when traces are off).
    traces: crate::telemetry::Parents,
}

impl PendingResults {
    /// Results of one fired batch, with its trace.
    pub fn push_all(&mut self, results: Vec<WindowResult>, trace: Option<crate::telemetry::TraceContext>) {
        if let Some(trace) = trace {
            self.traces.push(trace);
        }
        for result in results {
            self.push(result);
        }
    }

    /// The span of a write of these results, when any of them is traced: it continues
    /// the first batch's trace and links the others.
    pub fn write_span(&self, sink: &'static str) -> tracing::Span {
        if self.traces.is_empty() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "sink.write",
            trace_id = tracing::field::Empty,
            otel.kind = "client",
            sink,
            rows = self.results.len(),
            batches = self.traces.as_slice().len(),
        );
        crate::telemetry::follow(&span, self.traces.as_slice());
        span
    }

    pub fn push(&mut self, result: WindowResult) {
        let key = (result.sensor_id.clone(), result.event_type.clone(), result.window_start_ms);
        match self.index.get(&key) {
            Some(&at) => {
                if result.revision >= self.results[at].revision {
                    self.results[at] = result;
                }
            }
            None => {
                self.index.insert(key, self.results.len());
                self.results.push(result);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    pub fn as_slice(&self) -> &[WindowResult] {
        &self.results
    }

    /// The pending result of a window.
    pub fn get(&self, sensor_id: &str, event_type: &str, window_start_ms: i64) -> Option<&WindowResult> {
        let key = (sensor_id.into(), event_type.into(), window_start_ms);
        self.index.get(&key).map(|&at| &self.results[at])
    }

    /// Everything pending, in arrival order.
    pub fn take(&mut self) -> Vec<WindowResult> {
        self.index.clear();
        self.traces.clear();
        std::mem::take(&mut self.results)
    }
}

/// Told when a checkpoint is durable (the router releases its replay buffer).
pub trait CheckpointListener: Send + Sync {
    fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, checkpoint_id: u64);
}

impl CheckpointListener for crate::router::PartitionRouter {
    fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, checkpoint_id: u64) {
        crate::router::PartitionRouter::checkpoint_complete(self, partition, next_position, checkpoint_id);
    }
}

/// Several listeners told in turn (the router releases its log, the Kafka source
/// commits the offset).
pub struct CheckpointListeners(pub Vec<Arc<dyn CheckpointListener>>);

impl CheckpointListener for CheckpointListeners {
    fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, checkpoint_id: u64) {
        for listener in &self.0 {
            listener.checkpoint_complete(partition, next_position, checkpoint_id);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sink {0} is not running")]
pub struct SinkUnavailable(pub &'static str);

/// Health of one sink, readable without messaging it (it may be busy retrying).
#[derive(Debug, Default)]
pub struct SinkHealth {
    pub consecutive_failures: AtomicU64,
    pub failures: AtomicU64,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub pending_results: AtomicU64,
    pub pending_checkpoints: AtomicU64,
    /// Dead letters sent to the store sink and not yet written.
    pub pending_dead_letters: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SinkHealth {
    pub fn is_failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) > 0
    }

    pub fn record_success(&self, rows: u64) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.last_success_ms
            .store(u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0), Ordering::Relaxed);
    }

    /// The destination answered (a health check), with nothing written.
    pub fn record_reachable(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.last_success_ms
            .store(u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0), Ordering::Relaxed);
    }

    pub fn record_failure(&self, error: String) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(error);
    }

    pub fn snapshot(&self, name: &'static str) -> SinkHealthView {
        SinkHealthView {
            name,
            healthy: !self.is_failing(),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            batches_written: self.batches.load(Ordering::Relaxed),
            rows_written: self.rows.load(Ordering::Relaxed),
            pending_results: self.pending_results.load(Ordering::Relaxed),
            pending_checkpoints: self.pending_checkpoints.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkHealthView {
    pub name: &'static str,
    pub healthy: bool,
    pub consecutive_failures: u64,
    pub failures: u64,
    pub batches_written: u64,
    pub rows_written: u64,
    pub pending_results: u64,
    pub pending_checkpoints: u64,
    pub last_error: Option<String>,
}

/// Sinks a checkpoint passes through, in order, before the store sink writes it: each
/// forwards it once everything sent to it before the checkpoint is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Kafka,
    Elasticsearch,
}

pub struct Sinks {
    store: RwLock<Option<ActorRef<StoreMsg>>>,
    /// Output topics, when configured.
    kafka: RwLock<Option<ActorRef<kafka::KafkaSinkMsg>>>,
    kafka_configured: bool,
    /// The search cluster, when configured.
    elasticsearch: RwLock<Option<ActorRef<elasticsearch::EsSinkMsg>>>,
    elasticsearch_configured: bool,
    pub store_health: Arc<SinkHealth>,
    pub elasticsearch_health: Arc<SinkHealth>,
    /// The live feed (`GET /ws`): results once stored, accepted events.
    live: Arc<LiveHub>,
}

impl Default for Sinks {
    fn default() -> Self {
        Self::new()
    }
}

impl Sinks {
    /// Store only, with a live feed nobody has started (tests, `tidemark replay`).
    pub fn new() -> Self {
        Self::with_outputs(LiveHub::new(crate::config::WsConfig::default(), Arc::default()), false, false)
    }

    /// `kafka_configured`: results also go to output topics, and checkpoints pass through
    /// the Kafka sink (which forwards them once the results are acknowledged).
    /// `elasticsearch_configured`: results are also indexed, and checkpoints pass through
    /// the Elasticsearch sink (after the Kafka sink, when both are).
    pub fn with_outputs(live: Arc<LiveHub>, kafka_configured: bool, elasticsearch_configured: bool) -> Self {
        Self {
            store: RwLock::new(None),
            kafka: RwLock::new(None),
            kafka_configured,
            elasticsearch: RwLock::new(None),
            elasticsearch_configured,
            store_health: Arc::new(SinkHealth::default()),
            elasticsearch_health: Arc::new(SinkHealth::default()),
            live,
        }
    }

    pub fn live(&self) -> &Arc<LiveHub> {
        &self.live
    }

    pub fn set_elasticsearch(&self, actor: Option<ActorRef<elasticsearch::EsSinkMsg>>) {
        *self.elasticsearch.write() = actor;
    }

    pub fn elasticsearch_configured(&self) -> bool {
        self.elasticsearch_configured
    }

    pub fn elasticsearch(&self) -> Option<ActorRef<elasticsearch::EsSinkMsg>> {
        self.elasticsearch.read().clone()
    }

    pub fn set_store(&self, actor: Option<ActorRef<StoreMsg>>) {
        *self.store.write() = actor;
    }

    pub fn store(&self) -> Option<ActorRef<StoreMsg>> {
        self.store.read().clone()
    }

    pub fn set_kafka(&self, actor: Option<ActorRef<kafka::KafkaSinkMsg>>) {
        *self.kafka.write() = actor;
    }

    pub fn kafka_configured(&self) -> bool {
        self.kafka_configured
    }

    pub fn kafka(&self) -> Option<ActorRef<kafka::KafkaSinkMsg>> {
        self.kafka.read().clone()
    }

    /// Wait until the sinks wrote everything sent to them so far (the Kafka sink first:
    /// it forwards checkpoints to the store sink).
    pub async fn drain(&self, timeout: std::time::Duration) -> Result<(), String> {
        if self.kafka_configured {
            let kafka = self.kafka().ok_or("the kafka sink is restarting")?;
            let reply = kafka.call(kafka::KafkaSinkMsg::Flush, Some(timeout)).await.map_err(|e| e.to_string())?;
            if !reply.is_success() {
                return Err("the kafka sink did not drain in time".into());
            }
        }
        if self.elasticsearch_configured {
            let es = self.elasticsearch().ok_or("the elasticsearch sink is restarting")?;
            let reply = es.call(elasticsearch::EsSinkMsg::Flush, Some(timeout)).await.map_err(|e| e.to_string())?;
            if !reply.is_success() {
                return Err("the elasticsearch sink did not drain in time".into());
            }
        }
        let store = self.store().ok_or("the store sink is restarting")?;
        let reply = store.call(StoreMsg::Flush, Some(timeout)).await.map_err(|e| e.to_string())?;
        if !reply.is_success() {
            return Err("the store sink did not drain in time".into());
        }
        Ok(())
    }

    /// Hand window results (and the trace of the batch that fired them) to every sink.
    pub fn send_results(
        &self,
        results: Vec<WindowResult>,
        trace: Option<crate::telemetry::TraceContext>,
    ) -> Result<(), SinkUnavailable> {
        if self.kafka_configured {
            match self.kafka.read().as_ref() {
                Some(actor) => actor
                    .send_message(kafka::KafkaSinkMsg::Results(results.clone(), trace))
                    .map_err(|_| SinkUnavailable("kafka"))?,
                None => return Err(SinkUnavailable("kafka")),
            }
        }
        if self.elasticsearch_configured {
            match self.elasticsearch.read().as_ref() {
                Some(actor) => actor
                    .send_message(elasticsearch::EsSinkMsg::Results(results.clone(), trace))
                    .map_err(|_| SinkUnavailable("elasticsearch"))?,
                None => return Err(SinkUnavailable("elasticsearch")),
            }
        }
        self.send_store(StoreMsg::Results(results, trace))
    }

    /// Alerts the rules raised or resolved: to the store and the alerts topic.
    pub fn send_alerts(&self, alerts: Vec<crate::rules::Alert>) -> Result<(), SinkUnavailable> {
        if self.kafka_configured {
            match self.kafka.read().as_ref() {
                Some(actor) => actor
                    .send_message(kafka::KafkaSinkMsg::Alerts(alerts.clone()))
                    .map_err(|_| SinkUnavailable("kafka"))?,
                None => return Err(SinkUnavailable("kafka")),
            }
        }
        self.send_store(StoreMsg::Alerts(alerts))
    }

    /// Hand a checkpoint to the sinks, behind every result sent before it: to the first
    /// gate, which passes it on (see [`Gate`]).
    pub fn send_checkpoint(&self, checkpoint: CheckpointData) -> Result<(), SinkUnavailable> {
        if self.kafka_configured {
            return match self.kafka.read().as_ref() {
                Some(actor) => actor
                    .send_message(kafka::KafkaSinkMsg::Checkpoint(Box::new(checkpoint)))
                    .map_err(|_| SinkUnavailable("kafka")),
                None => Err(SinkUnavailable("kafka")),
            };
        }
        self.forward_checkpoint(Gate::Kafka, Box::new(checkpoint))
    }

    /// A gate acknowledged everything before `checkpoint`: pass it to the next one.
    pub fn forward_checkpoint(&self, after: Gate, checkpoint: Box<CheckpointData>) -> Result<(), SinkUnavailable> {
        if after == Gate::Kafka && self.elasticsearch_configured {
            return match self.elasticsearch.read().as_ref() {
                Some(actor) => actor
                    .send_message(elasticsearch::EsSinkMsg::Checkpoint(checkpoint))
                    .map_err(|_| SinkUnavailable("elasticsearch")),
                None => Err(SinkUnavailable("elasticsearch")),
            };
        }
        self.send_store(StoreMsg::Checkpoint(checkpoint))
    }

    pub fn send_store(&self, message: StoreMsg) -> Result<(), SinkUnavailable> {
        let letters = match &message {
            StoreMsg::DeadLetters(letters) => letters.len() as u64,
            _ => 0,
        };
        match self.store.read().as_ref() {
            Some(actor) => {
                actor.send_message(message).map_err(|_| SinkUnavailable("store"))?;
                self.store_health.pending_dead_letters.fetch_add(letters, Ordering::Relaxed);
                Ok(())
            }
            None => Err(SinkUnavailable("store")),
        }
    }
}
