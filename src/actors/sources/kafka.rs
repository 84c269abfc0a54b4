//! The Kafka source: a consumer-group member on `kafka.topic`. Each Kafka partition
//! assigned to this instance is one partition actor, whose positions are the Kafka
//! offsets.
//!
//! Checkpoints decide offsets. On assignment the partition is taken (the next ownership
//! epoch in the store, which fences any earlier owner), its checkpoint loaded, its actor
//! started from it, and the consumer positioned at the checkpoint's offset. On
//! revocation the actor checkpoints, the checkpoint is made durable, its position is
//! committed to Kafka, and the actor stops — all before the partition is released.
//! Offsets are committed only for complete checkpoints.
//!
//! No consumed offset is ever skipped: a message is handed to its partition's actor or
//! read again. When a partition has no actor (it is restarting), the partition is paused
//! and its messages dropped; the restarted actor is attached on this thread together with
//! a seek back to its checkpoint. Gaps in the offsets (retention deleted them before they
//! were read, compaction, transaction markers) are told to the actor, so its accounting
//! covers every offset; a retention gap is also logged, counted and dead-lettered.
//!
//! One memory bound for both modes: a partition is paused while its events since the
//! last complete checkpoint reach its share of `pipeline.max_buffered_events` (so a
//! store outage stops consumption instead of filling the sinks' mailboxes), or while its
//! actor has `kafka.max_in_flight` events to process.
//!
//! Polling runs on a thread of its own (the consumer's callbacks block on the store and
//! on actors), never on the async workers; a panic there fails the source loudly. The
//! thread only copies messages into per-partition batches: the partition actors decode
//! them, so parsing runs in parallel on their threads.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Timestamp};
use serde::Serialize;

use crate::actors::sinks::{CheckpointListener, Sinks};
use crate::config::Config;
use crate::ingest::SourceStatus;
use crate::messages::{
    DeadLetter, NoEvent, NoEventKind, PartitionId, PartitionMsg, Position, RawBatch, RejectReason, Source,
};
use crate::metrics::{Metrics, PartitionLabels, RejectLabels, SourceLabels};
use crate::router::PartitionRouter;
use crate::supervision::Topology;
use crate::supervision::partition::{PartitionFeed, PartitionSupervisorMsg};

/// Messages taken from the consumer before they are handed to partitions in one go.
const POLL_BATCH: usize = 4096;
/// Longest the poll thread waits on a store or actor call inside a rebalance.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often quiet partitions that are caught up get an ingest-clock tick.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// An actor to attach once the poll thread gets to it (it alone delivers events, so
/// attaching there keeps every partition's events in order).
struct Attach {
    partition: PartitionId,
    actor: ActorRef<PartitionMsg>,
    from: Position,
    /// Position the consumer at `from` (not needed when the assignment itself did).
    seek: bool,
}

/// Per-partition progress of the consumer for `/api/status` and the lag gauges.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub partition: PartitionId,
    /// Offset after the last message in the partition (high watermark; -1 unknown).
    pub high_watermark: i64,
    /// First offset the broker still keeps (-1 unknown).
    pub low_watermark: i64,
    /// Position processed by the partition actor.
    pub processed: u64,
    /// Messages not yet processed: high watermark − processed position.
    pub lag: i64,
    /// Last offset committed (a complete checkpoint; -1 none yet).
    pub committed: i64,
    /// Events since the partition's last complete checkpoint.
    pub unconfirmed: u64,
    pub paused: bool,
    /// Paused because its actor is restarting (resumed, from the checkpoint, on attach).
    pub waiting_for_actor: bool,
    /// Offsets deleted by retention before they were read (since this assignment).
    pub offsets_skipped: u64,
}

/// The poll thread's view of one assigned partition.
#[derive(Debug, Default)]
struct Cursor {
    /// Next offset expected from the consumer; `None` until known (no checkpoint:
    /// reading from the earliest retained offset).
    expected: Option<i64>,
    /// Paused for backpressure.
    backpressure: bool,
    /// Paused because no actor takes its events; cleared by the attach and its seek.
    detached: bool,
    committed: i64,
    offsets_skipped: u64,
    /// The partition's leader was connected at the last statistics report.
    leader_up: bool,
}

/// Everything the source shares with its poll thread, the partition supervisor (as the
/// partition feed) and the store sink (as a checkpoint listener that commits offsets).
pub struct KafkaShared {
    pub config: Arc<Config>,
    pub router: Arc<PartitionRouter>,
    pub metrics: Arc<Metrics>,
    pub sinks: Arc<Sinks>,
    pub topology: Arc<Topology>,
    pub runtime: tokio::runtime::Handle,
    attach: Mutex<VecDeque<Attach>>,
    consumer: RwLock<Option<Arc<BaseConsumer<SourceContext>>>>,
    /// Assigned partitions. Written on the poll thread (and in its rebalance callback).
    cursors: Mutex<BTreeMap<PartitionId, Cursor>>,
    /// Bumped by every rebalance: messages polled before one are read again.
    rebalances: AtomicU64,
    /// Set while the assignment callback starts partitions (their attach needs no seek).
    assigning: AtomicBool,
    /// The partition supervisor was restarted: start every assigned partition again.
    redrive: AtomicBool,
    /// Whether the consumer is running (for `/ready`).
    running: AtomicBool,
    /// When librdkafka last reported statistics, and when it last reported trouble (a
    /// client error, or a leader of an assigned partition not connected): the ingest
    /// clock only moves with fresh statistics and after an idle timeout of unbroken
    /// connection (see [`tick_caught_up`]).
    stats_at: Mutex<Option<Instant>>,
    trouble_at: Mutex<Option<Instant>>,
}

impl KafkaShared {
    pub fn new(
        config: Arc<Config>,
        router: Arc<PartitionRouter>,
        metrics: Arc<Metrics>,
        sinks: Arc<Sinks>,
        topology: Arc<Topology>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            config,
            router,
            metrics,
            sinks,
            topology,
            runtime,
            attach: Mutex::new(VecDeque::new()),
            consumer: RwLock::new(None),
            cursors: Mutex::new(BTreeMap::new()),
            rebalances: AtomicU64::new(0),
            assigning: AtomicBool::new(false),
            redrive: AtomicBool::new(false),
            running: AtomicBool::new(false),
            stats_at: Mutex::new(None),
            trouble_at: Mutex::new(None),
        }
    }

    fn topic(&self) -> &str {
        &self.config.kafka.topic
    }

    /// The in-flight bound: `kafka.max_in_flight`, or a quarter of the partition's share
    /// (with the checkpoint requested at a quarter too, a checkpoint is taken and
    /// written before the share fills).
    fn max_in_flight(&self) -> u64 {
        match self.config.kafka.max_in_flight {
            0 => (self.router.limit() / 4).max(1) as u64,
            explicit => explicit as u64,
        }
    }

    /// Consumer progress per assigned partition.
    pub fn lag(&self) -> Vec<PartitionLag> {
        let consumer = self.consumer.read().clone();
        let cursors = self.cursors.lock();
        cursors
            .iter()
            .map(|(&partition, cursor)| {
                let (low_watermark, high_watermark) = consumer
                    .as_ref()
                    .and_then(|c| crate::kafka::cached_watermarks(c.client(), self.topic(), partition as i32))
                    .unwrap_or((-1, -1));
                let processed = self.router.status(partition).processed_position;
                PartitionLag {
                    partition,
                    high_watermark,
                    low_watermark,
                    processed,
                    lag: if high_watermark >= 0 { (high_watermark - processed as i64).max(0) } else { -1 },
                    committed: cursor.committed,
                    unconfirmed: self.router.unconfirmed(partition),
                    paused: cursor.backpressure || cursor.detached,
                    waiting_for_actor: cursor.detached,
                    offsets_skipped: cursor.offsets_skipped,
                }
            })
            .collect()
    }

    /// Take the partition and start its actor; the offset to read from.
    fn start_partition(&self, partition: PartitionId) -> Result<Offset, String> {
        if !self.router.contains(partition) {
            let count = self
                .consumer
                .read()
                .clone()
                .and_then(|consumer| topic_partition_count(&consumer, self.topic()))
                .unwrap_or(partition + 1);
            return Err(partition_count_mismatch(self.topic(), count, self.router.partitions()));
        }
        let supervisor = self.topology.partition_supervisor().ok_or("the partition supervisor is not running")?;
        let started = self.runtime.block_on(async {
            supervisor.call(|reply| PartitionSupervisorMsg::Start { partition, reply }, Some(CALL_TIMEOUT)).await
        });
        match started {
            Ok(ractor::rpc::CallResult::Success(Ok(Some(from)))) => Ok(Offset::Offset(from as i64)),
            // No checkpoint: no state either, so read everything the topic still keeps.
            Ok(ractor::rpc::CallResult::Success(Ok(None))) => Ok(Offset::Beginning),
            Ok(ractor::rpc::CallResult::Success(Err(error))) => Err(error),
            other => Err(format!("partition {partition} did not start: {other:?}")),
        }
    }

    /// Checkpoint the partition, make it durable, commit its position, stop its actor.
    fn release(&self, consumer: &BaseConsumer<SourceContext>, partition: PartitionId) {
        if let Some(actor) = self.router.actor(partition) {
            let outcome = self.runtime.block_on(async {
                let position = actor
                    .call(PartitionMsg::CheckpointAndReply, Some(CALL_TIMEOUT))
                    .await
                    .map_err(|e| e.to_string())?
                    .success_or(())
                    .map_err(|_| "no answer".to_string())?;
                self.sinks.drain(CALL_TIMEOUT).await?;
                Ok::<Position, String>(position)
            });
            match outcome {
                Ok(position) => {
                    let mut offsets = TopicPartitionList::new();
                    let committed = offsets
                        .add_partition_offset(self.topic(), partition as i32, Offset::Offset(position as i64))
                        .and_then(|()| consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync));
                    if let Err(error) = committed {
                        // The store holds the checkpoint; the next owner starts from it.
                        tracing::warn!(partition, error = %error, "cannot commit the offset of a revoked partition");
                    }
                    tracing::info!(partition, position, "partition released after its checkpoint");
                }
                Err(error) => {
                    tracing::warn!(partition, error = %error, "partition released without a final checkpoint")
                }
            }
        }
        // Stopped even without a live actor, so a restart still pending does not run it.
        if let Some(supervisor) = self.topology.partition_supervisor() {
            let _ = self.runtime.block_on(async {
                supervisor.call(|reply| PartitionSupervisorMsg::Stop { partition, reply }, Some(CALL_TIMEOUT)).await
            });
        }
        self.router.clear_actor(partition);
        self.metrics.kafka_partitions_paused.get_or_create(&PartitionLabels { partition }).set(0);
    }

    /// Attach actors that (re)started, on the poll thread, positioning the consumer at
    /// their checkpoints. A failed seek stops the source (it rejoins the group and every
    /// partition restarts from its checkpoint).
    fn drain_attach(&self, consumer: &BaseConsumer<SourceContext>) -> Result<(), KafkaError> {
        loop {
            let Some(attach) = self.attach.lock().pop_front() else {
                return Ok(());
            };
            let mut cursors = self.cursors.lock();
            let Some(cursor) = cursors.get_mut(&attach.partition) else {
                // Revoked meanwhile: the actor is stopped by the revocation.
                continue;
            };
            if attach.seek {
                consumer.seek(
                    self.topic(),
                    attach.partition as i32,
                    Offset::Offset(attach.from as i64),
                    Duration::from_secs(10),
                )?;
                tracing::info!(
                    partition = attach.partition,
                    from = attach.from,
                    "partition restarted: reading again from its checkpoint"
                );
            }
            cursor.expected = Some(attach.from as i64);
            self.router.rewind(attach.partition, attach.from);
            self.router.attach(attach.partition, attach.actor, attach.from);
            if std::mem::take(&mut cursor.detached) && !cursor.backpressure {
                resume(consumer, self.topic(), attach.partition)?;
            }
            self.metrics
                .kafka_partitions_paused
                .get_or_create(&PartitionLabels { partition: attach.partition })
                .set(i64::from(cursor.backpressure));
        }
    }

    /// Start every assigned partition again (the partition tree was restarted).
    fn redrive(&self) -> Result<(), String> {
        let partitions: Vec<PartitionId> = self.cursors.lock().keys().copied().collect();
        for partition in partitions {
            self.start_partition(partition)?;
        }
        if !self.cursors.lock().is_empty() {
            tracing::warn!("partition supervisor restarted: every assigned partition restarts from its checkpoint");
        }
        Ok(())
    }
}

/// The message for a topic whose partition count differs from `pipeline.partitions`.
pub fn partition_count_mismatch(topic: &str, topic_partitions: u32, pipeline_partitions: u32) -> String {
    format!(
        "kafka.topic {topic:?} has {topic_partitions} partitions but pipeline.partitions is {pipeline_partitions} \
         (TIDEMARK__PIPELINE__PARTITIONS): set pipeline.partitions = {topic_partitions}, one partition actor per \
         Kafka partition"
    )
}

fn pause(consumer: &BaseConsumer<SourceContext>, topic: &str, partition: PartitionId) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition as i32);
    consumer.pause(&list)
}

fn resume(consumer: &BaseConsumer<SourceContext>, topic: &str, partition: PartitionId) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition as i32);
    consumer.resume(&list)
}

/// The partition supervisor's feed in Kafka mode: attach on the poll thread, seeking to
/// the checkpoint unless the assignment in progress positions the partition itself.
impl PartitionFeed for KafkaShared {
    fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position, _restart: bool) {
        let seek = !self.assigning.load(Ordering::SeqCst);
        self.attach.lock().push_back(Attach { partition, actor, from, seek });
    }

    fn supervisor_started(&self) {
        self.redrive.store(true, Ordering::SeqCst);
    }
}

/// Commit a partition's Kafka offset when its checkpoint is complete.
impl CheckpointListener for KafkaShared {
    fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, _checkpoint_id: u64) {
        let Some(consumer) = self.consumer.read().clone() else {
            return;
        };
        if !self.cursors.lock().contains_key(&partition) {
            return; // not ours (any more)
        }
        let mut offsets = TopicPartitionList::new();
        let committed = offsets
            .add_partition_offset(self.topic(), partition as i32, Offset::Offset(next_position as i64))
            .and_then(|()| consumer.commit(&offsets, rdkafka::consumer::CommitMode::Async));
        match committed {
            Ok(()) => {
                if let Some(cursor) = self.cursors.lock().get_mut(&partition) {
                    cursor.committed = cursor.committed.max(next_position as i64);
                }
            }
            Err(error) => tracing::debug!(partition, error = %error, "offset commit skipped"),
        }
    }
}

impl SourceStatus for KafkaShared {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn owned_partitions(&self) -> Option<Vec<PartitionId>> {
        Some(self.cursors.lock().keys().copied().collect())
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "topic": self.config.kafka.topic,
            "group": self.config.kafka.group_id,
            "running": self.running.load(Ordering::SeqCst),
            "partitions": self.lag(),
        })
    }

    fn problems(&self) -> Vec<String> {
        if self.running.load(Ordering::SeqCst) {
            Vec::new()
        } else {
            vec!["kafka source: not running (restarting or stopped)".to_string()]
        }
    }
}

pub struct SourceContext {
    shared: Arc<KafkaShared>,
    /// Set when the source must stop (an assignment it cannot serve, a failed seek).
    failed: Arc<Mutex<Option<String>>>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        *self.shared.trouble_at.lock() = Some(Instant::now());
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        *self.shared.stats_at.lock() = Some(Instant::now());
        let Some(topic) = statistics.topics.get(self.shared.topic()) else {
            return;
        };
        let up: std::collections::HashSet<i32> =
            statistics.brokers.values().filter(|b| b.state == "UP").map(|b| b.nodeid).collect();
        {
            let mut cursors = self.shared.cursors.lock();
            let mut all_up = true;
            for (id, partition) in &topic.partitions {
                if let Ok(partition_id) = PartitionId::try_from(*id)
                    && let Some(cursor) = cursors.get_mut(&partition_id)
                {
                    cursor.leader_up = partition.leader >= 0 && up.contains(&partition.leader);
                    all_up &= cursor.leader_up;
                }
            }
            if !all_up {
                *self.shared.trouble_at.lock() = Some(Instant::now());
            }
        }
        let assigned: Vec<PartitionId> = self.shared.cursors.lock().keys().copied().collect();
        for (id, partition) in &topic.partitions {
            let Ok(partition_id) = PartitionId::try_from(*id) else {
                continue;
            };
            if partition.hi_offset < 0
                || !assigned.contains(&partition_id)
                || !self.shared.router.contains(partition_id)
            {
                continue;
            }
            let processed = self.shared.router.status(partition_id).processed_position as i64;
            self.shared
                .metrics
                .kafka_consumer_lag
                .get_or_create(&PartitionLabels { partition: partition_id })
                .set((partition.hi_offset - processed).max(0));
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, error: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        let shared = &self.shared;
        shared.rebalances.fetch_add(1, Ordering::SeqCst);
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut offsets = TopicPartitionList::new();
                shared.assigning.store(true, Ordering::SeqCst);
                for element in partitions.elements() {
                    let partition = element.partition() as PartitionId;
                    let offset = match shared.start_partition(partition) {
                        Ok(offset) => offset,
                        Err(reason) => {
                            tracing::error!(partition, reason = %reason, "cannot serve an assigned partition");
                            *self.failed.lock() = Some(reason);
                            Offset::Beginning
                        }
                    };
                    if let Err(error) = offsets.add_partition_offset(element.topic(), element.partition(), offset) {
                        tracing::error!(partition, error = %error, "bad partition offset");
                    }
                    let expected = match offset {
                        Offset::Offset(from) => Some(from),
                        _ => None,
                    };
                    shared.cursors.lock().insert(partition, Cursor { expected, committed: -1, ..Cursor::default() });
                }
                shared.assigning.store(false, Ordering::SeqCst);
                if let Err(error) = consumer.assign(&offsets) {
                    *self.failed.lock() = Some(format!("assign failed: {error}"));
                }
                if let Err(error) = shared.drain_attach(consumer) {
                    *self.failed.lock() = Some(format!("cannot position a partition: {error}"));
                }
                let assigned: Vec<i32> = offsets.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?assigned, "kafka partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?revoked, "kafka partitions revoked");
                for partition in &revoked {
                    let partition = *partition as PartitionId;
                    shared.release(consumer, partition);
                    shared.cursors.lock().remove(&partition);
                }
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(error = %error, "unassign failed");
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

/// The source actor: owns the consumer and its poll thread.
pub struct KafkaSource;

pub struct KafkaSourceState {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub enum KafkaSourceMsg {
    /// The poll thread stopped on its own; fail so the supervisor restarts the source.
    Failed(String),
}

impl Actor for KafkaSource {
    type Msg = KafkaSourceMsg;
    type State = KafkaSourceState;
    type Arguments = Arc<KafkaShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<KafkaSourceMsg>,
        shared: Arc<KafkaShared>,
    ) -> Result<KafkaSourceState, ActorProcessingErr> {
        let failed = Arc::new(Mutex::new(None));
        let context = SourceContext { shared: Arc::clone(&shared), failed: Arc::clone(&failed) };
        let consumer: BaseConsumer<SourceContext> = crate::kafka::consumer_config(&shared.config.kafka)
            .create_with_context(context)
            .map_err(|error| format!("cannot create the Kafka consumer: {error}"))?;
        let consumer = Arc::new(consumer);
        let topic = shared.topic().to_string();
        let partitions = shared.router.partitions();
        let metadata_consumer = Arc::clone(&consumer);
        let count = tokio::task::spawn_blocking(move || topic_partition_count(&metadata_consumer, &topic))
            .await
            .map_err(|error| format!("metadata lookup failed: {error}"))?;
        if let Some(count) = count
            && count != partitions
        {
            return Err(partition_count_mismatch(shared.topic(), count, partitions).into());
        }
        consumer
            .subscribe(&[shared.topic()])
            .map_err(|error| format!("cannot subscribe to {}: {error}", shared.topic()))?;
        *shared.consumer.write() = Some(Arc::clone(&consumer));
        shared.cursors.lock().clear();
        shared.redrive.store(false, Ordering::SeqCst);
        shared.running.store(true, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kafka-source".into())
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(AssertUnwindSafe(|| poll_loop(&shared, &consumer, &stop, &failed)))
                            .unwrap_or_else(|panic| {
                                Err(format!("the poll thread panicked: {}", panic_message(&panic)))
                            });
                    shared.running.store(false, Ordering::SeqCst);
                    *shared.consumer.write() = None;
                    if let Err(reason) = outcome {
                        tracing::error!(reason = %reason, "kafka source failed");
                        let _ = myself.send_message(KafkaSourceMsg::Failed(reason));
                    }
                })
                .map_err(|error| format!("cannot start the poll thread: {error}"))?
        };
        Ok(KafkaSourceState { stop, thread: Some(thread) })
    }

    async fn handle(
        &self,
        _myself: ActorRef<KafkaSourceMsg>,
        message: KafkaSourceMsg,
        _state: &mut KafkaSourceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            KafkaSourceMsg::Failed(reason) => Err(reason.into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KafkaSourceMsg>,
        state: &mut KafkaSourceState,
    ) -> Result<(), ActorProcessingErr> {
        state.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = state.thread.take() {
            // Leaving the group runs the revocation (checkpoints, commits) on that thread.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

impl Drop for KafkaSourceState {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// The topic's partition count, if the broker answers and the topic exists.
fn topic_partition_count(consumer: &BaseConsumer<SourceContext>, topic: &str) -> Option<u32> {
    match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        Ok(metadata) => metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|&count| count > 0),
        Err(error) => {
            tracing::warn!(topic, error = %error, "cannot read the topic's metadata yet; partitions are checked on assignment");
            None
        }
    }
}

/// What a partition's actor is handed, in offset order.
enum Item {
    Raw(RawBatch),
    NoEvent(NoEvent),
}

fn poll_loop(
    shared: &Arc<KafkaShared>,
    consumer: &BaseConsumer<SourceContext>,
    stop: &AtomicBool,
    failed: &Mutex<Option<String>>,
) -> Result<(), String> {
    let mut last_tick = Instant::now();
    let received = shared.metrics.events_received.get_or_create(&SourceLabels { source: "kafka" }).clone();
    let mut taken: Vec<BorrowedMessage<'_>> = Vec::with_capacity(POLL_BATCH);
    let mut items: BTreeMap<PartitionId, Vec<Item>> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        if let Some(reason) = failed.lock().take() {
            return Err(reason);
        }
        if shared.redrive.swap(false, Ordering::SeqCst) {
            shared.redrive()?;
        }
        shared.drain_attach(consumer).map_err(|error| format!("cannot position a partition: {error}"))?;
        let rebalances = shared.rebalances.load(Ordering::SeqCst);
        let mut timeout = Duration::from_millis(100);
        taken.clear();
        while taken.len() < POLL_BATCH {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "kafka poll error");
                    break;
                }
                Some(Ok(message)) => {
                    let partition = message.partition() as PartitionId;
                    if !shared.router.contains(partition) {
                        // The topic grew since start-up.
                        let count = topic_partition_count(consumer, shared.topic()).unwrap_or(partition + 1);
                        return Err(partition_count_mismatch(shared.topic(), count, shared.router.partitions()));
                    }
                    taken.push(message);
                }
            }
            timeout = Duration::ZERO;
        }
        if shared.rebalances.load(Ordering::SeqCst) != rebalances {
            // Partitions were repositioned at their checkpoints meanwhile: what was
            // polled before is read again from there.
            taken.clear();
            continue;
        }
        received.inc_by(taken.len() as u64);
        #[cfg(feature = "chaos")]
        chaos_panic(shared, taken.len());
        sort_into_items(shared, consumer, &mut taken, &mut items);
        deliver(shared, consumer, &mut items).map_err(|error| format!("cannot pause a partition: {error}"))?;
        wait_for_actors(shared, stop);
        backpressure(shared, consumer).map_err(|error| format!("cannot pause or resume a partition: {error}"))?;
        if last_tick.elapsed() >= TICK_INTERVAL {
            last_tick = Instant::now();
            tick_caught_up(shared, consumer);
        }
    }
    Ok(())
}

/// Fault injection: panic the poll thread once, after `chaos.source_panic_after_messages`.
#[cfg(feature = "chaos")]
fn chaos_panic(shared: &KafkaShared, taken: usize) {
    static TAKEN: AtomicU64 = AtomicU64::new(0);
    static PANICKED: AtomicBool = AtomicBool::new(false);
    let after = shared.config.chaos.source_panic_after_messages;
    if after > 0
        && TAKEN.fetch_add(taken as u64, Ordering::SeqCst) + taken as u64 >= after
        && !PANICKED.swap(true, Ordering::SeqCst)
    {
        panic!("chaos: the kafka poll thread panics after {after} messages");
    }
}

/// Check each polled message against its partition's expected offset (duplicates after
/// a seek are dropped, gaps become `NoEvent`s) and group them per partition, in order.
fn sort_into_items(
    shared: &KafkaShared,
    consumer: &BaseConsumer<SourceContext>,
    taken: &mut Vec<BorrowedMessage<'_>>,
    items: &mut BTreeMap<PartitionId, Vec<Item>>,
) {
    let mut cursors = shared.cursors.lock();
    let partitions = cursors.len().max(1);
    let tracing_on = crate::telemetry::enabled();
    for message in taken.drain(..) {
        let partition = message.partition() as PartitionId;
        let offset = message.offset();
        let Some(cursor) = cursors.get_mut(&partition) else {
            continue; // revoked since it was fetched
        };
        if cursor.detached {
            continue; // read again from the checkpoint once an actor is attached
        }
        let queue = items.entry(partition).or_default();
        if let Some(expected) = cursor.expected {
            if offset < expected {
                continue; // already handed over (a re-fetch after a seek or resume)
            }
            if offset > expected {
                let skipped = (offset - expected) as u64;
                let letter = retention_gap(shared, consumer, partition, expected, offset);
                if letter.is_some() {
                    cursor.offsets_skipped += skipped;
                    shared.metrics.kafka_offsets_skipped.get_or_create(&PartitionLabels { partition }).inc_by(skipped);
                }
                queue.push(Item::NoEvent(NoEvent {
                    from: expected as Position,
                    to: offset as Position,
                    kind: NoEventKind::Skipped,
                    letter,
                }));
            }
        }
        cursor.expected = Some(offset + 1);
        let ingest_ms = match message.timestamp() {
            Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => ms,
            Timestamp::NotAvailable => chrono::Utc::now().timestamp_millis(),
        };
        let payload = message.payload().unwrap_or_default();
        if !matches!(queue.last(), Some(Item::Raw(_))) {
            queue.push(Item::Raw(RawBatch::with_capacity(POLL_BATCH / partitions)));
        }
        if let Some(Item::Raw(batch)) = queue.last_mut() {
            batch.push(offset as Position, ingest_ms, payload, message.key());
            if tracing_on {
                batch.traces.extend(traceparent(&message));
            }
        }
    }
}

/// The trace context a producer put in a message's `traceparent` header.
fn traceparent(message: &BorrowedMessage<'_>) -> Option<crate::telemetry::TraceContext> {
    use rdkafka::message::{Headers, Message};
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == crate::kafka::TRACEPARENT)
        .and_then(|header| std::str::from_utf8(header.value?).ok())
        .and_then(crate::telemetry::TraceContext::parse)
}

/// With traces on: the span of a polled batch, continuing its producers' traces (the
/// first, linking the others) or starting one (sampled by ratio); the batch then carries
/// this span's context to its partition.
fn consume_span(topic: &str, partition: PartitionId, batch: &mut RawBatch) -> tracing::Span {
    if !crate::telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "kafka.consume",
        trace_id = tracing::field::Empty,
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.source.name = topic,
        messaging.destination.partition.id = partition,
        messaging.batch.message_count = batch.len(),
    );
    crate::telemetry::follow(&span, batch.traces.as_slice());
    batch.traces.clear();
    if let Some(context) = crate::telemetry::TraceContext::of(&span) {
        batch.traces.push(context);
    }
    span
}

/// A gap `expected..offset` in a partition's offsets: a retention gap when the broker no
/// longer keeps `expected` (logged, dead-lettered); otherwise offsets without a message
/// (compaction, transaction markers).
fn retention_gap(
    shared: &KafkaShared,
    consumer: &BaseConsumer<SourceContext>,
    partition: PartitionId,
    expected: i64,
    offset: i64,
) -> Option<DeadLetter> {
    let low = match crate::kafka::cached_watermarks(consumer.client(), shared.topic(), partition as i32) {
        Some((low, _)) if low >= 0 => low,
        _ => consumer
            .fetch_watermarks(shared.topic(), partition as i32, Duration::from_secs(5))
            .map(|(low, _)| low)
            .unwrap_or(-1),
    };
    if low <= expected {
        tracing::debug!(partition, from = expected, to = offset, "offsets without a message (compaction or markers)");
        return None;
    }
    let lost_to = low.min(offset);
    tracing::error!(
        partition,
        from = expected,
        to = lost_to,
        lost = lost_to - expected,
        "kafka retention deleted offsets before they were read: these messages are lost"
    );
    shared
        .metrics
        .events_rejected
        .get_or_create(&RejectLabels { source: "kafka", reason: RejectReason::RetentionGap.as_str() })
        .inc_by((lost_to - expected) as u64);
    Some(DeadLetter {
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        source: Source::Kafka,
        reason: RejectReason::RetentionGap,
        error: format!(
            "{} partition {partition}: offsets {expected}..{lost_to} ({} messages) were deleted by the topic's \
             retention before tidemark read them; the next message read is at offset {offset}",
            shared.topic(),
            lost_to - expected
        ),
        sensor_id: None,
        event_type: None,
        event_time_ms: None,
        partition: Some(partition),
        position: Some(expected as Position),
        payload: String::new(),
    })
}

/// Hand each partition's items to its actor in order. A partition whose actor is
/// restarting is paused; it is read again from the checkpoint once one is attached.
fn deliver(
    shared: &KafkaShared,
    consumer: &BaseConsumer<SourceContext>,
    items: &mut BTreeMap<PartitionId, Vec<Item>>,
) -> KafkaResult<()> {
    for (&partition, queue) in items.iter_mut() {
        let mut delivered = true;
        for item in queue.drain(..) {
            if !delivered {
                continue;
            }
            delivered = match item {
                Item::Raw(mut batch) => {
                    let span = consume_span(shared.topic(), partition, &mut batch);
                    let _entered = span.enter();
                    shared.router.deliver_raw(partition, batch)
                }
                Item::NoEvent(no_event) => shared.router.deliver_no_event(partition, no_event),
            };
        }
        if !delivered {
            let mut cursors = shared.cursors.lock();
            if let Some(cursor) = cursors.get_mut(&partition)
                && !cursor.detached
            {
                cursor.detached = true;
                cursor.expected = None;
                pause(consumer, shared.topic(), partition)?;
                shared.metrics.kafka_partitions_paused.get_or_create(&PartitionLabels { partition }).set(1);
                tracing::debug!(partition, "partition paused until its actor is back");
            }
        }
    }
    Ok(())
}

/// Longest the poll thread waits for busy actors before pausing their partitions.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(250);

/// Hold off polling while an actor has `max_in_flight` events to process. Short stalls
/// end here: pausing a partition makes librdkafka drop what it prefetched for it and
/// fetch it again on resume, so it is kept for stalls longer than [`IN_FLIGHT_WAIT`].
fn wait_for_actors(shared: &KafkaShared, stop: &AtomicBool) {
    let max_in_flight = shared.max_in_flight();
    let started = Instant::now();
    loop {
        let busy = {
            let cursors = shared.cursors.lock();
            cursors.keys().any(|&partition| shared.router.in_flight(partition) >= max_in_flight)
        };
        if !busy || started.elapsed() >= IN_FLIGHT_WAIT || stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Pause partitions at the memory bound (events since the last complete checkpoint) or
/// the in-flight bound; resume them below half of both.
fn backpressure(shared: &KafkaShared, consumer: &BaseConsumer<SourceContext>) -> KafkaResult<()> {
    let limit = shared.router.limit() as u64;
    let max_in_flight = shared.max_in_flight();
    let mut cursors = shared.cursors.lock();
    for (&partition, cursor) in cursors.iter_mut() {
        let unconfirmed = shared.router.unconfirmed(partition);
        let in_flight = shared.router.in_flight(partition);
        if !cursor.backpressure && (unconfirmed >= limit || in_flight >= max_in_flight) {
            cursor.backpressure = true;
            if !cursor.detached {
                pause(consumer, shared.topic(), partition)?;
            }
            shared.metrics.kafka_partitions_paused.get_or_create(&PartitionLabels { partition }).set(1);
            tracing::debug!(partition, unconfirmed, in_flight, "partition paused (backpressure)");
        } else if cursor.backpressure && unconfirmed < limit / 2 && in_flight < max_in_flight / 2 {
            cursor.backpressure = false;
            if !cursor.detached {
                resume(consumer, shared.topic(), partition)?;
                shared.metrics.kafka_partitions_paused.get_or_create(&PartitionLabels { partition }).set(0);
            }
        }
    }
    Ok(())
}

/// Move the ingest clock of partitions that have read everything the broker has and
/// processed it: only then can no event older than the wall clock still be on its way,
/// so an idle decision never closes a window whose events are waiting in the topic (a
/// backlog older than `idle_timeout` is read before any key of it counts as idle, and a
/// broker outage does not make every sensor look idle).
fn tick_caught_up(shared: &KafkaShared, consumer: &BaseConsumer<SourceContext>) {
    // Only with a view of the broker that is fresh. While it cannot be reached, its high
    // watermark is unknown, and producers cannot deliver either: their events (stamped
    // when they were sent) arrive once it is back. So the clock stands still from the
    // first trouble until the connection has held for one idle timeout: a sensor counts
    // as idle only after being silent that long while we could have seen its events.
    let fresh = |at: Option<Instant>, within: Duration| at.is_some_and(|at| at.elapsed() < within);
    let grace = shared.config.pipeline.idle_timeout.max(Duration::from_secs(5));
    if !fresh(*shared.stats_at.lock(), Duration::from_secs(3)) || fresh(*shared.trouble_at.lock(), grace) {
        return;
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let cursors = shared.cursors.lock();
    for (&partition, cursor) in cursors.iter() {
        if cursor.detached || cursor.backpressure || !cursor.leader_up {
            continue;
        }
        let Some((low, high)) = crate::kafka::cached_watermarks(consumer.client(), shared.topic(), partition as i32)
        else {
            continue;
        };
        let caught_up = match cursor.expected {
            Some(expected) => high >= 0 && expected >= high,
            None => high >= 0 && high <= low,
        };
        if caught_up && shared.router.in_flight(partition) == 0 {
            shared.router.send(partition, PartitionMsg::Tick { now_ms });
        }
    }
}
