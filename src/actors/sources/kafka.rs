//! The Kafka source: a consumer-group member on `kafka.topic`. Each Kafka partition
//! assigned to this instance is one partition actor, whose positions are the Kafka
//! offsets.
//!
//! Checkpoints decide offsets. On assignment the partition's checkpoint is loaded from
//! the shared store, its actor starts from it, and the consumer starts reading at the
//! checkpoint's position. On revocation the actor checkpoints, the checkpoint is made
//! durable, its position is committed to Kafka, and the actor stops — all before the
//! partition is released. Offsets are committed only for complete checkpoints, so a
//! killed instance's partitions resume, wherever they land, from state and position that
//! agree. A partition actor that fails is restarted from its checkpoint and the consumer
//! seeks its partition back to it.
//!
//! Polling runs on a thread of its own (the consumer's callbacks block on the store and
//! on actors), never on the async workers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::gauge::Gauge;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Timestamp};
use serde::Serialize;

use crate::actors::sinks::{CheckpointListener, Sinks};
use crate::config::Config;
use crate::ingest::{BodyFormat, ParseLimits, parse_body};
use crate::messages::{
    DeadLetter, Event, MAX_DEAD_LETTER_PAYLOAD, PartitionId, PartitionMsg, Position, RejectReason, Source, StoreMsg,
    truncate_payload,
};
use crate::metrics::{Metrics, PartitionLabels, RejectLabels, SourceLabels};
use crate::router::PartitionRouter;
use crate::store::Store;
use crate::supervision::Topology;
use crate::supervision::partition::{PartitionFeed, PartitionSupervisorMsg};

/// Messages taken from the consumer before they are handed to partitions in one go.
const POLL_BATCH: usize = 2048;
/// Longest the poll thread waits on a store or actor call inside a rebalance.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An actor to attach once the poll thread gets to it (it alone delivers events, so
/// attaching there keeps every partition's events in order).
struct Attach {
    partition: PartitionId,
    actor: ActorRef<PartitionMsg>,
    from: Position,
    /// The actor replaces a failed one: seek the partition back to `from`.
    seek: bool,
}

/// Per-partition progress of the consumer for `/api/status` and the lag gauges.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub partition: PartitionId,
    /// Offset after the last message in the partition (high watermark).
    pub high_watermark: i64,
    /// Position processed by the partition actor.
    pub processed: u64,
    /// Messages not yet processed: high watermark − processed position.
    pub lag: i64,
    /// Last offset committed (a complete checkpoint).
    pub committed: i64,
    pub paused: bool,
}

/// Everything the source shares with its poll thread, the partition supervisor (as the
/// partition feed) and the store sink (as a checkpoint listener that commits offsets).
pub struct KafkaShared {
    pub config: Arc<Config>,
    pub router: Arc<PartitionRouter>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub sinks: Arc<Sinks>,
    pub topology: Arc<Topology>,
    pub runtime: tokio::runtime::Handle,
    /// Dead-letter topic producer.
    pub producer: FutureProducer,
    attach: Mutex<VecDeque<Attach>>,
    consumer: RwLock<Option<Arc<BaseConsumer<SourceContext>>>>,
    lag: Mutex<HashMap<PartitionId, PartitionLag>>,
}

impl KafkaShared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        router: Arc<PartitionRouter>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        sinks: Arc<Sinks>,
        topology: Arc<Topology>,
        runtime: tokio::runtime::Handle,
        producer: FutureProducer,
    ) -> Self {
        Self {
            config,
            router,
            store,
            metrics,
            sinks,
            topology,
            runtime,
            producer,
            attach: Mutex::new(VecDeque::new()),
            consumer: RwLock::new(None),
            lag: Mutex::new(HashMap::new()),
        }
    }

    fn topic(&self) -> &str {
        &self.config.kafka.topic
    }

    /// Consumer progress per assigned partition.
    pub fn lag(&self) -> Vec<PartitionLag> {
        let mut lag: Vec<PartitionLag> = self.lag.lock().values().cloned().collect();
        lag.sort_by_key(|l| l.partition);
        for entry in &mut lag {
            entry.processed = self.router.status(entry.partition).processed_position;
            entry.lag = (entry.high_watermark - entry.processed as i64).max(0);
        }
        lag
    }

    fn lag_gauge(&self, partition: PartitionId) -> Gauge {
        self.metrics.kafka_consumer_lag.get_or_create(&PartitionLabels { partition }).clone()
    }

    /// Load the partition's checkpoint and start its actor; the position to read from.
    fn assign(&self, partition: PartitionId) -> Result<Option<Position>, String> {
        let supervisor = self.topology.partition_supervisor().ok_or("the partition supervisor is not running")?;
        let partitions = self.router.partitions();
        if partition >= partitions {
            return Err(format!(
                "Kafka partition {partition} is outside pipeline.partitions = {partitions}: set it to the topic's partition count"
            ));
        }
        let mut attempt = 0u32;
        let restored = loop {
            let load = self.store.load_checkpoint(partition, partitions);
            match self.runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, load).await }) {
                Ok(Ok(restored)) => break restored,
                Ok(Err(error)) if !error.is_retriable() => return Err(error.to_string()),
                outcome => {
                    attempt += 1;
                    if attempt >= 10 {
                        return Err(format!("cannot load the checkpoint of partition {partition}: {outcome:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
            }
        };
        let from = restored.as_ref().map(|r| r.next_position);
        let started = self.runtime.block_on(async {
            supervisor
                .call(|reply| PartitionSupervisorMsg::Start { partition, restored, reply }, Some(CALL_TIMEOUT))
                .await
        });
        match started {
            Ok(ractor::rpc::CallResult::Success(Ok(()))) => Ok(from),
            Ok(ractor::rpc::CallResult::Success(Err(error))) => Err(error),
            other => Err(format!("partition {partition} did not start: {other:?}")),
        }
    }

    /// Checkpoint the partition, make it durable, commit its position, stop its actor.
    fn release(&self, consumer: &BaseConsumer<SourceContext>, partition: PartitionId) {
        let Some(actor) = self.router.actor(partition) else {
            return;
        };
        let outcome = self.runtime.block_on(async {
            let position = actor
                .call(PartitionMsg::CheckpointAndReply, Some(CALL_TIMEOUT))
                .await
                .map_err(|e| e.to_string())?
                .success_or(())
                .map_err(|_| "no answer".to_string())?;
            let sink = self.sinks.store().ok_or("the store sink is not running")?;
            let flushed = sink.call(StoreMsg::Flush, Some(CALL_TIMEOUT)).await.map_err(|e| e.to_string())?;
            if !flushed.is_success() {
                return Err("the store sink did not flush in time".to_string());
            }
            Ok::<Position, String>(position)
        });
        match outcome {
            Ok(position) => {
                let mut offsets = TopicPartitionList::new();
                let committed = offsets
                    .add_partition_offset(self.topic(), partition as i32, Offset::Offset(position as i64))
                    .and_then(|()| consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync));
                if let Err(error) = committed {
                    // The store holds the checkpoint; the next owner starts at or before it
                    // and skips what it covers.
                    tracing::warn!(partition, error = %error, "cannot commit the offset of a revoked partition");
                }
                tracing::info!(partition, position, "partition released after its checkpoint");
            }
            Err(error) => tracing::warn!(partition, error = %error, "partition released without a final checkpoint"),
        }
        if let Some(supervisor) = self.topology.partition_supervisor() {
            let _ = self.runtime.block_on(async {
                supervisor.call(|reply| PartitionSupervisorMsg::Stop { partition, reply }, Some(CALL_TIMEOUT)).await
            });
        }
        self.router.clear_actor(partition);
        self.lag.lock().remove(&partition);
    }

    /// Attach actors that (re)started, on the poll thread. A failed seek stops the source
    /// (it rejoins the group and every partition restarts from its checkpoint).
    fn drain_attach(&self, consumer: &BaseConsumer<SourceContext>) -> Result<(), KafkaError> {
        loop {
            let Some(attach) = self.attach.lock().pop_front() else {
                return Ok(());
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
            self.router.rewind(attach.partition, attach.from);
            self.router.attach(attach.partition, attach.actor, attach.from);
        }
    }
}

/// The partition supervisor's feed in Kafka mode: attach on the poll thread, seeking
/// back to the checkpoint when an actor replaces a failed one.
impl PartitionFeed for KafkaShared {
    fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position, restart: bool) {
        self.attach.lock().push_back(Attach { partition, actor, from, seek: restart });
    }
}

/// Commit a partition's Kafka offset when its checkpoint is complete.
impl CheckpointListener for KafkaShared {
    fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, _checkpoint_id: u64) {
        let Some(consumer) = self.consumer.read().clone() else {
            return;
        };
        let mut offsets = TopicPartitionList::new();
        let committed = offsets
            .add_partition_offset(self.topic(), partition as i32, Offset::Offset(next_position as i64))
            .and_then(|()| consumer.commit(&offsets, rdkafka::consumer::CommitMode::Async));
        match committed {
            Ok(()) => {
                if let Some(entry) = self.lag.lock().get_mut(&partition) {
                    entry.committed = next_position as i64;
                }
            }
            Err(error) => tracing::debug!(partition, error = %error, "offset commit skipped"),
        }
    }
}

pub struct SourceContext {
    shared: Arc<KafkaShared>,
    /// Set when the source must stop (an assignment it cannot serve, a failed seek).
    failed: Arc<Mutex<Option<String>>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(self.shared.topic()) else {
            return;
        };
        let mut lag = self.shared.lag.lock();
        for (id, partition) in &topic.partitions {
            if *id < 0 || partition.hi_offset < 0 {
                continue;
            }
            let partition_id = *id as PartitionId;
            let Some(entry) = lag.get_mut(&partition_id) else {
                continue; // not assigned here
            };
            entry.high_watermark = partition.hi_offset;
            let processed = self.shared.router.status(partition_id).processed_position as i64;
            self.shared.lag_gauge(partition_id).set((partition.hi_offset - processed).max(0));
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, error: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        let shared = &self.shared;
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut offsets = TopicPartitionList::new();
                for element in partitions.elements() {
                    let partition = element.partition() as PartitionId;
                    let offset = match shared.assign(partition) {
                        Ok(Some(from)) => Offset::Offset(from as i64),
                        // No checkpoint yet: the committed offset, or the earliest.
                        Ok(None) => Offset::Stored,
                        Err(reason) => {
                            tracing::error!(partition, reason = %reason, "cannot serve an assigned partition");
                            *self.failed.lock() = Some(reason);
                            Offset::Stored
                        }
                    };
                    if let Err(error) = offsets.add_partition_offset(element.topic(), element.partition(), offset) {
                        tracing::error!(partition, error = %error, "bad partition offset");
                    }
                    shared
                        .lag
                        .lock()
                        .insert(partition, PartitionLag { partition, committed: -1, ..PartitionLag::default() });
                }
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
                    shared.release(consumer, *partition as PartitionId);
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
        consumer
            .subscribe(&[shared.topic()])
            .map_err(|error| format!("cannot subscribe to {}: {error}", shared.topic()))?;
        let consumer = Arc::new(consumer);
        *shared.consumer.write() = Some(Arc::clone(&consumer));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kafka-source".into())
                .spawn(move || {
                    let outcome = poll_loop(&shared, &consumer, &stop, &failed);
                    *shared.consumer.write() = None;
                    if let Err(reason) = outcome {
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

fn poll_loop(
    shared: &Arc<KafkaShared>,
    consumer: &BaseConsumer<SourceContext>,
    stop: &AtomicBool,
    failed: &Mutex<Option<String>>,
) -> Result<(), String> {
    let limits = ParseLimits { max_string_bytes: shared.config.ingest.max_string_bytes };
    let max_in_flight = shared.config.kafka.max_in_flight as u64;
    let mut paused: HashSet<PartitionId> = HashSet::new();
    let mut batches: HashMap<PartitionId, Vec<Event>> = HashMap::new();
    let mut last_tick = Instant::now();
    let received = shared.metrics.events_received.get_or_create(&SourceLabels { source: "kafka" }).clone();
    let accepted = shared.metrics.events_accepted.get_or_create(&SourceLabels { source: "kafka" }).clone();
    while !stop.load(Ordering::SeqCst) {
        if let Some(reason) = failed.lock().take() {
            return Err(reason);
        }
        shared.drain_attach(consumer).map_err(|error| format!("cannot position a partition: {error}"))?;
        let mut taken = 0;
        let mut timeout = Duration::from_millis(100);
        while taken < POLL_BATCH {
            match consumer.poll(timeout) {
                None => break,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "kafka poll error");
                    break;
                }
                Some(Ok(message)) => {
                    taken += 1;
                    received.inc();
                    if let Some(event) = decode(shared, &message, limits) {
                        accepted.inc();
                        batches.entry(message.partition() as PartitionId).or_default().push(event);
                    }
                }
            }
            timeout = Duration::ZERO;
        }
        for (partition, events) in batches.iter_mut() {
            if !events.is_empty() {
                shared.router.deliver(*partition, std::mem::take(events));
            }
        }
        backpressure(shared, consumer, &mut paused, max_in_flight);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            // Idle flushing needs the ingest clock to move when a partition is quiet.
            let now_ms = chrono::Utc::now().timestamp_millis();
            for partition in shared.lag.lock().keys() {
                if shared.router.in_flight(*partition) == 0 {
                    shared.router.send(*partition, PartitionMsg::Tick { now_ms });
                }
            }
        }
    }
    Ok(())
}

/// Pause partitions whose actor is behind; resume them below half the bound.
fn backpressure(
    shared: &KafkaShared,
    consumer: &BaseConsumer<SourceContext>,
    paused: &mut HashSet<PartitionId>,
    max_in_flight: u64,
) {
    let assigned: Vec<PartitionId> = shared.lag.lock().keys().copied().collect();
    paused.retain(|p| assigned.contains(p));
    for partition in assigned {
        let in_flight = shared.router.in_flight(partition);
        let mut list = TopicPartitionList::new();
        list.add_partition(shared.topic(), partition as i32);
        if !paused.contains(&partition) && in_flight > max_in_flight {
            if consumer.pause(&list).is_ok() {
                paused.insert(partition);
                tracing::debug!(partition, in_flight, "partition paused");
            }
        } else if paused.contains(&partition) && in_flight <= max_in_flight / 2 && consumer.resume(&list).is_ok() {
            paused.remove(&partition);
        }
        if let Some(entry) = shared.lag.lock().get_mut(&partition) {
            entry.paused = paused.contains(&partition);
        }
    }
}

/// One message, one event. Anything else goes to the dead-letter topic (and store) with
/// the reason, and the source goes on.
fn decode(shared: &KafkaShared, message: &BorrowedMessage<'_>, limits: ParseLimits) -> Option<Event> {
    let partition = message.partition() as PartitionId;
    let offset = message.offset();
    let ingest_ms = match message.timestamp() {
        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => ms,
        Timestamp::NotAvailable => chrono::Utc::now().timestamp_millis(),
    };
    let payload = message.payload().unwrap_or_default();
    let is_array = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let outcome = match parse_body(payload, BodyFormat::Json, limits, ingest_ms) {
        _ if is_array => {
            (RejectReason::InvalidValue, "a message must hold exactly one event object, not an array".to_string())
        }
        Ok(parsed) if parsed.events.len() == 1 && parsed.rejected.is_empty() => {
            let mut events = parsed.events;
            let mut event = events.pop()?;
            event.position = offset as Position;
            return Some(event);
        }
        Ok(parsed) if parsed.events.len() + parsed.rejected.len() != 1 => {
            (RejectReason::InvalidValue, "a message must hold exactly one event object".to_string())
        }
        Ok(parsed) => match parsed.rejected.into_iter().next() {
            Some(rejection) => (rejection.reason, rejection.message),
            None => (RejectReason::Unparsable, "no event".to_string()),
        },
        Err(error) => (RejectReason::Unparsable, error.to_string()),
    };
    let (reason, error) = outcome;
    shared.metrics.events_rejected.get_or_create(&RejectLabels { source: "kafka", reason: reason.as_str() }).inc();
    let text = String::from_utf8_lossy(payload);
    let letter = DeadLetter {
        received_at_ms: ingest_ms,
        source: Source::Kafka,
        reason,
        error: format!("{} partition {partition} offset {offset}: {error}", shared.topic()),
        sensor_id: message.key().and_then(|k| std::str::from_utf8(k).ok()).map(Into::into),
        event_type: None,
        event_time_ms: None,
        partition: Some(partition),
        position: Some(offset as Position),
        payload: truncate_payload(&text, MAX_DEAD_LETTER_PAYLOAD),
    };
    let _ = shared.sinks.send_store(StoreMsg::DeadLetters(vec![letter]));
    let dlq = shared.config.kafka.dlq_topic();
    let partition_text = partition.to_string();
    let offset_text = offset.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "tidemark.reason", value: Some(reason.as_str()) })
        .insert(Header { key: "tidemark.error", value: Some(error.as_str()) })
        .insert(Header { key: "tidemark.source.topic", value: Some(shared.topic()) })
        .insert(Header { key: "tidemark.source.partition", value: Some(partition_text.as_str()) })
        .insert(Header { key: "tidemark.source.offset", value: Some(offset_text.as_str()) });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq).payload(payload).headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Err((error, _)) = shared.producer.send_result(record) {
        tracing::warn!(error = %error, partition, offset, "cannot queue a message for the dead-letter topic");
    }
    None
}
