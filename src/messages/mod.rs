//! The messages actors exchange, and the event, result and checkpoint types they carry.
//!
//! Keeping them in one place makes the protocol between router, partitions and sinks
//! readable on one screen; actors import from here rather than from each other.

mod event;

pub use event::*;

use std::sync::Arc;

use compact_str::CompactString;
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

/// Events of one partition, in position order, shared between the replay buffer and the
/// partition actor (no copy).
pub type EventBatch = Arc<Vec<Event>>;

/// Messages to a partition actor.
pub enum PartitionMsg {
    /// Events in position order, and the trace they continue (only when traces are on
    /// and the request that brought them is sampled).
    Events(EventBatch, Option<crate::telemetry::TraceContext>),
    /// Undecoded messages of a source (Kafka), in position order: the actor decodes them,
    /// so parsing runs on the partitions' threads rather than the source's one.
    Raw(RawBatch),
    /// Positions that carry no event (a malformed message, offsets the source skipped),
    /// in order with the events around them, so the partition's accounting covers every
    /// position it consumed.
    NoEvent(NoEvent),
    /// The ingest clock advanced with no events for this partition. Ticks are kept in the
    /// replay log, so a replay flushes idle keys at the same points.
    Tick {
        now_ms: i64,
    },
    /// Take a checkpoint now (timer, buffer pressure, shutdown).
    Checkpoint,
    /// Fire every open window (end of a bounded input); replies once the results are
    /// handed to the sinks.
    FlushAll(RpcReplyPort<()>),
    /// Checkpoint and reply once the checkpoint is handed to the store sink (shutdown).
    CheckpointAndReply(RpcReplyPort<Position>),
    Status(RpcReplyPort<PartitionStatus>),
}

/// Messages as a source read them: payloads in one buffer, in position order.
#[derive(Clone, Debug, Default)]
pub struct RawBatch {
    pub bytes: Vec<u8>,
    pub records: Vec<RawRecord>,
    /// The traces this batch continues (a consume span; empty when traces are off).
    pub traces: crate::telemetry::Parents,
}

/// One message of a [`RawBatch`].
#[derive(Clone, Copy, Debug)]
pub struct RawRecord {
    pub position: Position,
    /// The message's timestamp (the partition's ingest clock).
    pub ingest_ms: i64,
    /// Payload, then key, in `bytes`.
    pub start: u32,
    pub payload_len: u32,
    pub key_len: u32,
}

impl RawBatch {
    pub fn with_capacity(records: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(records * 112),
            records: Vec::with_capacity(records),
            traces: crate::telemetry::Parents::default(),
        }
    }

    pub fn push(&mut self, position: Position, ingest_ms: i64, payload: &[u8], key: Option<&[u8]>) {
        let key = key.unwrap_or_default();
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(payload);
        self.bytes.extend_from_slice(key);
        self.records.push(RawRecord {
            position,
            ingest_ms,
            start,
            payload_len: payload.len() as u32,
            key_len: key.len() as u32,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn last_position(&self) -> Option<Position> {
        self.records.last().map(|record| record.position)
    }

    pub fn payload(&self, record: &RawRecord) -> &[u8] {
        let start = record.start as usize;
        &self.bytes[start..start + record.payload_len as usize]
    }

    pub fn key(&self, record: &RawRecord) -> Option<&[u8]> {
        let start = (record.start + record.payload_len) as usize;
        (record.key_len > 0).then(|| &self.bytes[start..start + record.key_len as usize])
    }
}

/// Positions `from..to` of a partition that carry no event.
#[derive(Clone, Debug, PartialEq)]
pub struct NoEvent {
    pub from: Position,
    /// Exclusive.
    pub to: Position,
    pub kind: NoEventKind,
    /// Kept in the dead-letter store with the checkpoint that covers these positions.
    pub letter: Option<DeadLetter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoEventKind {
    /// A message that is not a valid event (counted as dead-lettered).
    DeadLettered,
    /// Offsets without a message: deleted by retention before they were read, compacted
    /// away, or transaction markers (counted as skipped).
    Skipped,
}

/// Where every position a partition consumed went, since its state began. Part of the
/// checkpoint, so replays after a failure do not count twice:
/// `next_position - base_position == events_processed + dead_lettered + skipped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionCounters {
    /// First position the state covers (0 embedded; the first Kafka offset read).
    pub base_position: Position,
    /// Events applied to windows, late ones included.
    pub events_processed: u64,
    /// Of those, events that arrived after their window closed (also dead-lettered).
    pub events_late: u64,
    /// Positions whose message was dead-lettered instead of processed (malformed, poison).
    pub dead_lettered: u64,
    /// Offsets without a message (retention gaps, compaction, transaction markers).
    pub skipped: u64,
}

impl PartitionCounters {
    /// Positions accounted for: processed + dead-lettered + skipped.
    pub fn accounted(&self) -> u64 {
        self.events_processed + self.dead_lettered + self.skipped
    }
}

/// Messages to the store sink.
pub enum StoreMsg {
    /// Results of one fired batch, with its trace (when traced).
    Results(Vec<WindowResult>, Option<crate::telemetry::TraceContext>),
    /// Alerts the rules raised or resolved.
    Alerts(Vec<crate::rules::Alert>),
    DeadLetters(Vec<DeadLetter>),
    /// Written after every result sent before it; complete once committed.
    Checkpoint(Box<CheckpointData>),
    /// Write everything pending and reply.
    Flush(RpcReplyPort<()>),
    /// The linger timer fired: write what is pending.
    Linger,
    Status(RpcReplyPort<SinkStatus>),
}

/// One partition's checkpoint: the position it has consumed up to and the state of the
/// keys that changed since its previous checkpoint (incremental, like Flink's RocksDB
/// checkpoints), so the cost follows the change rate, not the number of keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointData {
    pub partition: PartitionId,
    /// Partition count when taken: state hashed for another count is refused on restore.
    pub partitions: u32,
    /// The next position to consume: every event before it is reflected in the state.
    pub next_position: Position,
    /// The partition's ingest clock (drives idle flushing).
    pub clock_ms: i64,
    /// Sequence of this partition's checkpoints, for visibility.
    pub checkpoint_id: u64,
    pub taken_at_ms: i64,
    /// Ownership epoch of the writer; the store refuses a checkpoint whose epoch is not
    /// the partition's current one (a stale owner after a rebalance). 0: unfenced.
    pub owner_epoch: u64,
    pub counters: PartitionCounters,
    /// Keys whose state changed, with their serialized state.
    pub upserts: Vec<KeyStateBlob>,
    /// Keys dropped since the previous checkpoint.
    pub deletes: Vec<(CompactString, CompactString)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyStateBlob {
    pub sensor_id: CompactString,
    pub event_type: CompactString,
    pub state: Vec<u8>,
}

/// A partition's complete checkpoint as loaded from the store.
#[derive(Clone, Debug, Default)]
pub struct RestoredPartition {
    pub next_position: Position,
    pub clock_ms: i64,
    pub checkpoint_id: u64,
    pub counters: PartitionCounters,
    pub keys: Vec<KeyStateBlob>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub partition: PartitionId,
    pub open_keys: usize,
    pub open_windows: usize,
    pub next_position: Position,
    /// Windows fired by this actor since it started (not checkpointed).
    pub windows_fired: u64,
    pub last_checkpoint_id: u64,
    /// Every position consumed since the state began, and where it went.
    pub counters: PartitionCounters,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkStatus {
    pub name: String,
    pub pending_results: usize,
    pub pending_dead_letters: usize,
    pub pending_checkpoints: usize,
    pub batches_written: u64,
    pub rows_written: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
}
