//! The small handles the gateway (and any front end) uses to hand events in and to ask
//! sources how they are doing, so front ends never depend on a source's internals.

use std::time::Duration;

use async_trait::async_trait;

use crate::messages::{Event, PartitionId};

/// Why accepted-looking events were not taken. Every variant means: nothing of the
/// request was taken (embedded), or the client must retry it (Kafka: some may already
/// be on the topic; the consumer's window keys make a retried event count once per
/// offset, not once per event — see the README's Kafka section).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestRefusal {
    #[error("the pipeline is behind on checkpoints (partition {partition}: {buffered} of {limit} events); retry later")]
    Backpressure { partition: PartitionId, buffered: usize, limit: usize, retry_after: Duration },
    #[error(
        "the request puts {events} events into partition {partition}, which holds at most {limit} unconfirmed \
         events (pipeline.max_buffered_events / pipeline.partitions); split it into smaller requests"
    )]
    TooLarge { partition: PartitionId, events: usize, limit: usize },
    #[error("tidemark cannot make the events durable: {reason}")]
    Unavailable { reason: String },
    #[error("tidemark is shutting down")]
    Closed,
    #[error("Kafka did not acknowledge the events ({reason}); {acknowledged} of {total} were written")]
    BrokerUnavailable { acknowledged: usize, total: usize, reason: String },
}

/// Where accepted events go: the embedded router (in-process log) or a Kafka topic.
#[async_trait]
pub trait Ingest: Send + Sync {
    /// Take `events`; `Ok` only once they are safe by this ingestion's definition.
    async fn accept(&self, events: Vec<Event>) -> Result<(), IngestRefusal>;
}

/// What a source tells `/api/status` and `/ready`.
pub trait SourceStatus: Send + Sync {
    /// `kafka`, `mqtt`, …
    fn name(&self) -> &'static str;
    /// Partitions this instance serves now, when the source decides (a consumer group
    /// assigns them); `None`: all of them.
    fn owned_partitions(&self) -> Option<Vec<PartitionId>>;
    /// Source-specific status (lag, positions, connection) for `/api/status`.
    fn status(&self) -> serde_json::Value;
    /// What keeps the source from being ready, one line each (empty: ready).
    fn problems(&self) -> Vec<String>;
}
