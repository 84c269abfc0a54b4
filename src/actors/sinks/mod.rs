//! Sinks: where window results, dead letters and checkpoints go.
//!
//! [`Sinks`] is the routing table of the sink actors (owned by the sink supervisor, read
//! by partitions and the gateway) plus the in-process live feed.

pub mod file;
pub mod kafka;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use ractor::ActorRef;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::messages::{CheckpointData, PartitionId, Position, StoreMsg, WindowResult};

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

pub struct Sinks {
    store: RwLock<Option<ActorRef<StoreMsg>>>,
    /// Output topics, when configured.
    kafka: RwLock<Option<ActorRef<kafka::KafkaSinkMsg>>>,
    kafka_configured: bool,
    pub store_health: Arc<SinkHealth>,
    live: broadcast::Sender<Arc<WindowResult>>,
}

impl Sinks {
    pub fn new(live_capacity: usize) -> Self {
        Self::with_kafka(live_capacity, false)
    }

    /// `kafka_configured`: results also go to output topics, and checkpoints pass through
    /// the Kafka sink (which forwards them once the results are acknowledged).
    pub fn with_kafka(live_capacity: usize, kafka_configured: bool) -> Self {
        let (live, _) = broadcast::channel(live_capacity.max(16));
        Self {
            store: RwLock::new(None),
            kafka: RwLock::new(None),
            kafka_configured,
            store_health: Arc::new(SinkHealth::default()),
            live,
        }
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
        let store = self.store().ok_or("the store sink is restarting")?;
        let reply = store.call(StoreMsg::Flush, Some(timeout)).await.map_err(|e| e.to_string())?;
        if !reply.is_success() {
            return Err("the store sink did not drain in time".into());
        }
        Ok(())
    }

    /// Hand window results to every sink.
    pub fn send_results(&self, results: Vec<WindowResult>) -> Result<(), SinkUnavailable> {
        if self.kafka_configured {
            match self.kafka.read().as_ref() {
                Some(actor) => actor
                    .send_message(kafka::KafkaSinkMsg::Results(results.clone()))
                    .map_err(|_| SinkUnavailable("kafka"))?,
                None => return Err(SinkUnavailable("kafka")),
            }
        }
        self.send_store(StoreMsg::Results(results))
    }

    /// Hand a checkpoint to the sinks, behind every result sent before it.
    pub fn send_checkpoint(&self, checkpoint: CheckpointData) -> Result<(), SinkUnavailable> {
        if self.kafka_configured {
            return match self.kafka.read().as_ref() {
                Some(actor) => actor
                    .send_message(kafka::KafkaSinkMsg::Checkpoint(Box::new(checkpoint)))
                    .map_err(|_| SinkUnavailable("kafka")),
                None => Err(SinkUnavailable("kafka")),
            };
        }
        self.send_store(StoreMsg::Checkpoint(Box::new(checkpoint)))
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

    /// Publish results to live subscribers (WebSocket, dashboard). Slow subscribers miss
    /// results rather than slowing the pipeline; the store is the record.
    pub fn publish_live(&self, results: &[WindowResult]) {
        if self.live.receiver_count() == 0 {
            return;
        }
        for result in results {
            let _ = self.live.send(Arc::new(result.clone()));
        }
    }

    pub fn subscribe_live(&self) -> broadcast::Receiver<Arc<WindowResult>> {
        self.live.subscribe()
    }
}
