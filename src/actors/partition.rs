//! The partition actor: owns the windows, watermarks and scorer state of the keys hashed
//! to its partition, turns events into window results, and checkpoints its state.
//!
//! Processing is a pure function of the ordered log it receives (events and ingest-clock
//! ticks) and the checkpoint it started from, which is what makes a restart with replay
//! produce exactly the results an uninterrupted run produces.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use compact_str::CompactString;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

use crate::actors::sinks::Sinks;
use crate::keys::{KeyTable, Tombstone, Tombstones, stable_key_hash};

/// The event type under which a checkpoint keeps the tombstones of evicted keys, one
/// blob per shard (sensor id: the shard number). Event types cannot hold control
/// characters, so no real key has it.
const TOMBSTONE_TYPE: &str = "\u{1}evicted-keys";

/// The event type under which a checkpoint keeps a sensor's alert-rule state
/// ([`SensorRules`], all its event types in one blob).
const RULES_TYPE: &str = "\u{1}rules";

/// Checkpointed key states and tombstones are `TM`, a format version, then postcard.
/// Version 1 (written before the header existed) is the bare postcard encoding of the
/// same types and is still read. (A version-1 blob cannot start with `TM`: its first
/// byte is a varint of the key's maximum event time, which would have to be 42 ms after
/// the epoch.) Version 2 is a key state of tumbling windows only ([`KeyStateV2`]);
/// version 3 holds any window kind ([`KeyStateV3`]); version 4 packs the `context`
/// model's tables ([`crate::scoring::legacy`] converts the older ones).
const STATE_FORMAT: u8 = 4;

fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(value, vec![b'T', b'M', STATE_FORMAT])
}

/// The format version of a checkpointed blob and its postcard bytes.
fn state_payload(bytes: &[u8]) -> Result<(u8, &[u8]), String> {
    match bytes {
        [b'T', b'M', version @ 2..=STATE_FORMAT, rest @ ..] => Ok((*version, rest)),
        [b'T', b'M', version, ..] => Err(format!(
            "state format version {version} is not one this build reads (1 to {STATE_FORMAT}); run the newer tidemark"
        )),
        legacy => Ok((1, legacy)),
    }
}

/// A blob with the same encoding in every version (tombstones, rule state).
fn decode_blob<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (version, rest) = state_payload(bytes)?;
    postcard::from_bytes(rest).map_err(|error| format!("{error} (format version {version})"))
}

fn decode_key_state(bytes: &[u8]) -> Result<KeyState, String> {
    match state_payload(bytes)? {
        (STATE_FORMAT, rest) => postcard::from_bytes(rest).map_err(|error| error.to_string()),
        (3, rest) => postcard::from_bytes::<KeyStateV3>(rest)
            .map(KeyState::from)
            .map_err(|error| format!("{error} (format version 3)")),
        (version, rest) => postcard::from_bytes::<KeyStateV2>(rest)
            .map(KeyState::from)
            .map_err(|error| format!("{error} (format version {version})")),
    }
}
use crate::messages::{
    CheckpointData, DeadLetter, Event, KeyStateBlob, MAX_DEAD_LETTER_PAYLOAD, NoEvent, NoEventKind, PartitionCounters,
    PartitionId, PartitionMsg, PartitionStatus, Position, RawBatch, RawRecord, RejectReason, RestoredPartition,
    StoreMsg, WindowResult, truncate_payload,
};
use crate::metrics::{Metrics, PartitionLabels, PositionLabels, RejectLabels, SeverityLabels, SourceLabels};
use crate::router::{IDLE, SlotProgress};
use crate::rules::{Alert, RulesHandle, SensorRules, Silence};
use crate::scoring::legacy::ScorerStateV3;
use crate::scoring::{ScorerState, Scoring};
use crate::window::{Fired, KeyWindows, WindowSpec, Windowing, Windows};

/// Where a source's malformed messages are also republished (Kafka's dead-letter topic,
/// with the reason in headers).
pub trait RejectedMessages: Send + Sync {
    fn publish(&self, letter: &DeadLetter, payload: &[u8], key: Option<&[u8]>);
}

/// What every partition shares: settings, scoring, sinks, metrics.
pub struct PartitionContext {
    /// Limits for decoding raw messages ([`PartitionMsg::Raw`]).
    pub limits: crate::ingest::ParseLimits,
    /// The source that delivers raw messages: its name and where it republishes rejects.
    pub raw_source: Option<RawSource>,
    pub partitions: u32,
    pub windowing: Windowing,
    pub scoring: Scoring,
    pub checkpoint_interval: Duration,
    /// Checkpoint after this many events as well (0: interval only).
    pub checkpoint_max_events: u64,
    pub metrics: Arc<Metrics>,
    pub sinks: Arc<Sinks>,
    pub chaos: crate::config::ChaosConfig,
    pub key_limits: KeyLimits,
    /// Alert rules (replaced by a reload).
    pub rules: Arc<RulesHandle>,
}

/// How many keys a partition holds and how long an idle one stays.
#[derive(Clone, Copy, Debug)]
pub struct KeyLimits {
    /// `usize::MAX`: no limit.
    pub max_per_partition: usize,
    /// `None`: keys stay.
    pub ttl_ms: Option<i64>,
    pub tombstone_ttl_ms: i64,
}

impl KeyLimits {
    pub fn from_config(pipeline: &crate::config::PipelineConfig) -> Self {
        Self {
            max_per_partition: match pipeline.max_keys_per_partition {
                0 => usize::MAX,
                limit => limit,
            },
            ttl_ms: (!pipeline.key_ttl.is_zero())
                .then(|| i64::try_from(pipeline.key_ttl.as_millis()).unwrap_or(i64::MAX)),
            tombstone_ttl_ms: i64::try_from(pipeline.key_tombstone_ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// A source that hands partitions undecoded messages.
pub struct RawSource {
    pub source: crate::messages::Source,
    /// Names the messages in dead letters, e.g. the Kafka topic.
    pub origin: String,
    pub rejects: Option<Arc<dyn RejectedMessages>>,
}

pub struct PartitionArgs {
    pub partition: PartitionId,
    pub context: Arc<PartitionContext>,
    pub progress: Arc<SlotProgress>,
    pub restored: Option<RestoredPartition>,
    /// Ownership epoch the store fences this actor's checkpoints with (0: unfenced).
    pub owner_epoch: u64,
    /// After restarts that made no progress: checkpoint every this many events until
    /// the instant, so an actor that keeps crashing still moves its checkpoint forward.
    pub checkpoint_boost: Option<(u64, tokio::time::Instant)>,
}

/// The actor: stateless; everything lives in [`PartitionState`].
pub struct PartitionActor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct KeyState {
    windows: Windows,
    scorer: ScorerState,
    #[serde(skip)]
    dirty: bool,
}

/// A key state of format versions 1 and 2 (tumbling windows only).
#[derive(Serialize, Deserialize)]
struct KeyStateV2 {
    windows: KeyWindows,
    scorer: ScorerStateV3,
}

impl From<KeyStateV2> for KeyState {
    fn from(old: KeyStateV2) -> Self {
        Self { windows: Windows::Tumbling(old.windows), scorer: old.scorer.into(), dirty: false }
    }
}

/// A key state of format version 3 (any window kind, the scorer's state as it was).
#[derive(Serialize, Deserialize)]
struct KeyStateV3 {
    windows: Windows,
    scorer: ScorerStateV3,
}

impl From<KeyStateV3> for KeyState {
    fn from(old: KeyStateV3) -> Self {
        Self { windows: old.windows, scorer: old.scorer.into(), dirty: false }
    }
}

struct Counters {
    processed: Counter,
    late: Counter,
    fired: Counter,
    updates: Counter,
    open_keys: Gauge,
    keys_evicted: Counter,
    keys_refused: Counter,
    consumed: Gauge,
    positions_processed: Gauge,
    positions_dead_lettered: Gauge,
    positions_skipped: Gauge,
}

pub struct PartitionState {
    partition: PartitionId,
    context: Arc<PartitionContext>,
    progress: Arc<SlotProgress>,
    keys: KeyTable<KeyState>,
    /// Where the windows of evicted keys stood ([`Tombstone`]).
    tombstones: Tombstones,
    /// Tombstone shards changed since the last checkpoint, serialized.
    tombstone_upserts: Vec<KeyStateBlob>,
    deleted: Vec<(CompactString, CompactString)>,
    next_position: Position,
    clock_ms: i64,
    checkpoint_id: u64,
    owner_epoch: u64,
    /// Where every consumed position went (checkpointed with the state).
    counters: PartitionCounters,
    /// Whether `counters.base_position` is known (restored, or a position was seen).
    counting: bool,
    /// `next_position` of the last checkpoint sent (complete or not).
    last_checkpoint_position: Option<Position>,
    events_since_checkpoint: u64,
    /// See [`PartitionArgs::checkpoint_boost`].
    checkpoint_boost: Option<(u64, tokio::time::Instant)>,
    fired: Vec<Fired>,
    results: Vec<WindowResult>,
    /// Alert-rule state per sensor, and whether it changed since the last checkpoint.
    rule_states: rustc_hash::FxHashMap<CompactString, (SensorRules, bool)>,
    alerts: Vec<Alert>,
    /// Largest event time the partition accepted (`absence` rules' event-time clock).
    max_event_ms: i64,
    /// The span of the batch being processed, when it is traced.
    batch_span: Option<tracing::Span>,
    dead_letters: Vec<DeadLetter>,
    metrics: Counters,
    windows_fired: u64,
    /// Counted at each checkpoint (it walks every key), published with the status.
    open_windows: usize,
    #[cfg(feature = "chaos")]
    chaos_rng: rand_chacha::ChaCha8Rng,
}

/// One gauge of `tidemark_partition_positions`. (A family's guard lives to the end of the
/// statement that took it: taking two labels of one family in one statement deadlocks.)
fn position_gauge(metrics: &Metrics, partition: PartitionId, outcome: &'static str) -> Gauge {
    metrics.positions.get_or_create(&PositionLabels { partition, outcome }).clone()
}

/// An injected fault: unwinds like a panic (the actor fails with `message`, supervision
/// restarts it) without the panic hook, so hundreds of injected faults do not bury a
/// test's own failure under their backtraces.
#[cfg(feature = "chaos")]
fn injected_panic(message: String) -> ! {
    std::panic::resume_unwind(Box::new(message))
}

/// How often (in ingest-clock time) idle keys are looked for.
fn sweep_interval(spec: &WindowSpec) -> i64 {
    (spec.idle_timeout_ms / 4).clamp(1, 1_000)
}

impl Actor for PartitionActor {
    type Msg = PartitionMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let PartitionArgs { partition, context, progress, restored, owner_epoch, checkpoint_boost } = args;
        let labels = PartitionLabels { partition };
        let metrics = &context.metrics;
        let metric_counters = Counters {
            processed: metrics.events_processed.get_or_create(&labels).clone(),
            late: metrics.events_late.get_or_create(&labels).clone(),
            fired: metrics.windows_fired.get_or_create(&labels).clone(),
            updates: metrics.window_updates.get_or_create(&labels).clone(),
            open_keys: metrics.open_keys.get_or_create(&labels).clone(),
            keys_evicted: metrics.keys_evicted.get_or_create(&labels).clone(),
            keys_refused: metrics.keys_refused.get_or_create(&labels).clone(),
            consumed: metrics.positions_consumed.get_or_create(&labels).clone(),
            positions_processed: position_gauge(metrics, partition, "processed"),
            positions_dead_lettered: position_gauge(metrics, partition, "dead_lettered"),
            positions_skipped: position_gauge(metrics, partition, "skipped"),
        };
        let mut keys: KeyTable<KeyState> = KeyTable::default();
        let mut tombstones = Tombstones::default();
        let mut rule_states = rustc_hash::FxHashMap::default();
        let (next_position, clock_ms, checkpoint_id, counters, counting) = match restored {
            Some(restored) => {
                keys.reserve(restored.keys.len());
                for blob in restored.keys {
                    if blob.event_type == TOMBSTONE_TYPE {
                        let entries = decode_blob::<Vec<(u64, Tombstone)>>(&blob.state).map_err(|error| {
                            format!("partition {partition}: checkpointed tombstones cannot be read: {error}")
                        })?;
                        tombstones.restore(entries);
                        continue;
                    }
                    if blob.event_type == RULES_TYPE {
                        let state: SensorRules = decode_blob(&blob.state).map_err(|error| {
                            format!(
                                "partition {partition}: checkpointed rule state of {} cannot be read: {error}",
                                blob.sensor_id
                            )
                        })?;
                        rule_states.insert(blob.sensor_id, (state, false));
                        continue;
                    }
                    let state = decode_key_state(&blob.state).map_err(|error| {
                        format!(
                            "partition {partition}: checkpointed state of ({}, {}) cannot be read: {error}",
                            blob.sensor_id, blob.event_type
                        )
                    })?;
                    keys.insert(&blob.sensor_id, &blob.event_type, state);
                }
                (restored.next_position, restored.clock_ms, restored.checkpoint_id, restored.counters, true)
            }
            None => (0, i64::MIN, 0, PartitionCounters::default(), false),
        };
        metric_counters.open_keys.set(keys.len() as i64);
        let max_event_ms = keys.values().map(|key| key.windows.horizon().0).max().unwrap_or(i64::MIN);
        progress.processed.store(next_position, Ordering::Release);
        myself.send_interval(context.checkpoint_interval, || PartitionMsg::Checkpoint);
        #[cfg(feature = "chaos")]
        let chaos_rng = {
            use rand::SeedableRng;
            // Differs per partition and per incarnation, so a replay does not re-inject
            // the same panic (only a real poison event fails every time).
            rand_chacha::ChaCha8Rng::seed_from_u64(
                context.chaos.seed ^ (u64::from(partition) << 32) ^ rand::random::<u32>() as u64,
            )
        };
        Ok(PartitionState {
            partition,
            context,
            progress,
            keys,
            tombstones,
            tombstone_upserts: Vec::new(),
            deleted: Vec::new(),
            next_position,
            clock_ms,
            checkpoint_id,
            owner_epoch,
            counters,
            counting,
            last_checkpoint_position: None,
            events_since_checkpoint: 0,
            checkpoint_boost,
            fired: Vec::new(),
            results: Vec::new(),
            rule_states,
            alerts: Vec::new(),
            max_event_ms,
            batch_span: None,
            dead_letters: Vec::new(),
            metrics: metric_counters,
            windows_fired: 0,
            open_windows: 0,
            #[cfg(feature = "chaos")]
            chaos_rng,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PartitionMsg::Events(batch, trace) => {
                let span = trace.map(|trace| state.batch_span(batch.len(), &[trace]));
                let _entered = span.as_ref().map(tracing::Span::enter);
                state.batch_span = span.clone();
                let every = state.checkpoint_every();
                // In slices of the checkpoint spacing, so a checkpoint can fall inside a
                // long batch (a replay after a crash arrives as a few large ones).
                let slice = if every == 0 { batch.len().max(1) } else { usize::try_from(every).unwrap_or(usize::MAX) };
                for events in batch.chunks(slice) {
                    state.process(events);
                    state.emit()?;
                    if every > 0 && state.events_since_checkpoint >= every {
                        state.checkpoint()?;
                    }
                }
            }
            PartitionMsg::Raw(batch) => {
                let span = (!batch.traces.is_empty()).then(|| state.batch_span(batch.len(), batch.traces.as_slice()));
                let _entered = span.as_ref().map(tracing::Span::enter);
                state.batch_span = span.clone();
                state.process_raw(&batch);
                state.emit()?;
                let every = state.checkpoint_every();
                if every > 0 && state.events_since_checkpoint >= every {
                    state.checkpoint()?;
                }
            }
            PartitionMsg::NoEvent(no_event) => {
                state.skip(no_event);
                state.emit()?;
            }
            PartitionMsg::Tick { now_ms } => {
                state.advance_clock(now_ms);
                state.emit()?;
            }
            PartitionMsg::Checkpoint => {
                state.emit()?;
                state.checkpoint()?;
            }
            PartitionMsg::CheckpointAndReply(reply) => {
                state.emit()?;
                state.checkpoint()?;
                let _ = reply.send(state.next_position);
            }
            PartitionMsg::FlushAll(reply) => {
                state.flush_all();
                state.emit()?;
                let _ = reply.send(());
            }
            PartitionMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        state.batch_span = None;
        Ok(())
    }
}

impl PartitionState {
    /// Events between checkpoints (0: on the interval only).
    fn checkpoint_every(&mut self) -> u64 {
        match self.checkpoint_boost {
            Some((every, until)) if tokio::time::Instant::now() < until => every,
            Some(_) => {
                self.checkpoint_boost = None;
                self.context.checkpoint_max_events
            }
            None => self.context.checkpoint_max_events,
        }
    }

    fn process(&mut self, batch: &[Event]) {
        let live = self.context.sinks.live();
        if live.wants(crate::live::Kind::Events) {
            // Not the overlap of a replay: those were published before.
            let fresh = batch.partition_point(|event| event.position < self.next_position);
            live.publish_events(&batch[fresh..]);
        }
        let context = Arc::clone(&self.context);
        let windowing = &context.windowing;
        let rules = context.rules.current();
        let absence = rules.has_absence();
        let previous_clock = self.clock_ms;
        let mut processed = 0u64;
        for event in batch {
            if event.position < self.next_position {
                continue; // already reflected (overlap of a replay)
            }
            self.start_counting(event.position);
            if event.position > self.next_position {
                // Positions the source did not report (it reports gaps it knows of with
                // `NoEvent`): count them, so the accounting still covers every position.
                self.counters.skipped += event.position - self.next_position;
            }
            if let Some(failure) = self.progress.quarantined(event.position) {
                self.dead_letters.push(DeadLetter::for_event(event, RejectReason::Poison, failure, self.partition));
                self.counters.dead_lettered += 1;
                self.next_position = event.position + 1;
                continue;
            }
            self.progress.processing.store(event.position, Ordering::Relaxed);
            #[cfg(feature = "chaos")]
            self.chaos(event);
            self.clock_ms = self.clock_ms.max(event.ingest_ms);
            let scoring = &self.context.scoring;
            let (open_keys, tombstones) = (self.keys.len(), &mut self.tombstones);
            let max_keys = self.context.key_limits.max_per_partition;
            let key = self.keys.get_or_try_insert_with(&event.sensor_id, &event.event_type, || {
                if open_keys >= max_keys {
                    return None;
                }
                let horizon = tombstones
                    .take(stable_key_hash(&event.sensor_id, &event.event_type))
                    .map(|tombstone| (tombstone.max_event_ms, tombstone.closed_before_ms));
                let windows = Windows::new(windowing.spec(&event.event_type), horizon);
                Some(KeyState { windows, scorer: scoring.scorer(&event.event_type).new_state(), dirty: true })
            });
            let Some(key) = key else {
                self.metrics.keys_refused.inc();
                self.context
                    .metrics
                    .events_rejected
                    .get_or_create(&RejectLabels { source: "pipeline", reason: RejectReason::KeyLimit.as_str() })
                    .inc();
                self.dead_letters.push(DeadLetter::for_event(
                    event,
                    RejectReason::KeyLimit,
                    format!(
                        "sensorId: partition {} already holds {max_keys} keys (pipeline.max_keys_per_partition); \
                         this ({}, {}) would open one more",
                        self.partition, event.sensor_id, event.event_type
                    ),
                    self.partition,
                ));
                self.counters.dead_lettered += 1;
                self.next_position = event.position + 1;
                continue;
            };
            key.dirty = true;
            let spec = windowing.spec(&event.event_type);
            if key.windows.kind() != spec.kind {
                // The configuration changed the event type's window kind since the
                // checkpoint: the open windows of the old kind are dropped, the new kind
                // starts where they stood.
                tracing::warn!(
                    sensor_id = %event.sensor_id,
                    event_type = %event.event_type,
                    "window kind changed from {} to {}: the key's open windows are dropped",
                    key.windows.kind().as_str(),
                    spec.kind.as_str()
                );
                key.windows = Windows::new(spec, Some(key.windows.horizon()));
            }
            let before = self.fired.len();
            match key.windows.add(spec, event.timestamp_ms, event.value, event.ingest_ms, &mut self.fired) {
                Ok(()) => {
                    self.max_event_ms = self.max_event_ms.max(event.timestamp_ms);
                    if absence && let Some((state, dirty)) = self.rule_states.get_mut(&event.sensor_id) {
                        let now_ms = chrono::Utc::now().timestamp_millis();
                        *dirty |= rules.on_event(
                            state,
                            &event.sensor_id,
                            &event.event_type,
                            event.timestamp_ms,
                            now_ms,
                            &mut self.alerts,
                        );
                    }
                    if self.fired.len() > before {
                        let now_ms = chrono::Utc::now().timestamp_millis();
                        self.context.metrics.ingest_to_fire.observe((now_ms - event.ingest_ms) as f64 / 1000.0);
                        Self::score_fired(
                            &self.context,
                            &event.sensor_id,
                            &event.event_type,
                            key,
                            self.fired.drain(before..),
                            &mut self.results,
                            now_ms,
                        );
                    }
                }
                Err(late) => {
                    self.counters.events_late += 1;
                    self.metrics.late.inc();
                    self.dead_letters.push(DeadLetter::for_event(
                        event,
                        RejectReason::Late,
                        format!(
                            "timestamp: event time {} is in window starting {} which closed at watermark {} \
                             (max out-of-orderness {} ms, allowed lateness {} ms)",
                            crate::store::ser::rfc3339(event.timestamp_ms),
                            crate::store::ser::rfc3339(late.window_start_ms),
                            crate::store::ser::rfc3339(late.watermark_ms),
                            spec.out_of_orderness_ms,
                            spec.allowed_lateness_ms
                        ),
                        self.partition,
                    ));
                }
            }
            self.next_position = event.position + 1;
            processed += 1;
        }
        self.counters.events_processed += processed;
        self.events_since_checkpoint += processed;
        self.progress.processing.store(IDLE, Ordering::Relaxed);
        self.progress.processed.store(self.next_position, Ordering::Release);
        self.metrics.processed.inc_by(processed);
        self.metrics.open_keys.set(self.keys.len() as i64);
        self.sweep_if_due(previous_clock);
    }

    fn publish_counters(&mut self) {
        self.progress.publish_status(PartitionStatus {
            partition: self.partition,
            open_keys: self.keys.len(),
            open_windows: self.open_windows,
            next_position: self.next_position,
            windows_fired: self.windows_fired,
            last_checkpoint_id: self.checkpoint_id,
            counters: self.counters,
        });
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let counters = &self.counters;
        self.metrics.consumed.set(gauge(self.next_position.saturating_sub(counters.base_position)));
        self.metrics.positions_processed.set(gauge(counters.events_processed));
        self.metrics.positions_dead_lettered.set(gauge(counters.dead_lettered));
        self.metrics.positions_skipped.set(gauge(counters.skipped));
    }

    /// Decode a source's messages and process them in order; a message that is not a
    /// valid event is dead-lettered at its position.
    fn process_raw(&mut self, batch: &RawBatch) {
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        let mut accepted = 0u64;
        for record in &batch.records {
            if record.position < self.next_position {
                continue;
            }
            let payload = batch.payload(record);
            match crate::ingest::parse::parse_event(payload, self.context.limits, record.ingest_ms) {
                Ok(mut event) => {
                    event.position = record.position;
                    events.push(event);
                    accepted += 1;
                }
                Err((reason, error)) => {
                    self.process(&events);
                    events.clear();
                    let letter = self.rejected_message(batch, record, reason, error);
                    self.skip(NoEvent {
                        from: record.position,
                        to: record.position + 1,
                        kind: NoEventKind::DeadLettered,
                        letter: Some(letter),
                    });
                }
            }
        }
        self.process(&events);
        if let Some(raw) = &self.context.raw_source {
            let source = raw.source.as_str();
            self.context.metrics.events_accepted.get_or_create(&SourceLabels { source }).inc_by(accepted);
        }
    }

    fn rejected_message(
        &self,
        batch: &RawBatch,
        record: &RawRecord,
        reason: RejectReason,
        error: String,
    ) -> DeadLetter {
        let payload = batch.payload(record);
        let key = batch.key(record);
        let (source, origin) = match &self.context.raw_source {
            Some(raw) => (raw.source, raw.origin.as_str()),
            None => (crate::messages::Source::Pipeline, "source"),
        };
        self.context
            .metrics
            .events_rejected
            .get_or_create(&RejectLabels { source: source.as_str(), reason: reason.as_str() })
            .inc();
        let letter = DeadLetter {
            received_at_ms: record.ingest_ms,
            source,
            reason,
            error: format!("{origin} partition {} offset {}: {error}", self.partition, record.position),
            sensor_id: key.and_then(|k| std::str::from_utf8(k).ok()).filter(|k| k.len() <= 256).map(Into::into),
            event_type: None,
            event_time_ms: None,
            partition: Some(self.partition),
            position: Some(record.position),
            payload: truncate_payload(&String::from_utf8_lossy(payload), MAX_DEAD_LETTER_PAYLOAD),
        };
        if let Some(rejects) = self.context.raw_source.as_ref().and_then(|raw| raw.rejects.as_ref()) {
            rejects.publish(&letter, payload, key);
        }
        letter
    }

    /// The first position of a state that starts empty is where its accounting begins.
    #[inline]
    fn start_counting(&mut self, position: Position) {
        if !self.counting {
            self.counting = true;
            self.counters.base_position = position;
            self.next_position = self.next_position.max(position);
        }
    }

    /// Positions without an event: account for them, keep their dead letter.
    fn skip(&mut self, no_event: NoEvent) {
        if no_event.to <= self.next_position {
            return; // already covered (overlap of a re-read)
        }
        let from = no_event.from.max(self.next_position);
        self.start_counting(from);
        let from = from.max(self.next_position);
        let count = no_event.to - from;
        match no_event.kind {
            NoEventKind::DeadLettered => self.counters.dead_lettered += count,
            NoEventKind::Skipped => self.counters.skipped += count,
        }
        if let Some(letter) = no_event.letter {
            self.dead_letters.push(letter);
        }
        self.next_position = no_event.to;
        self.progress.processed.store(self.next_position, Ordering::Release);
    }

    #[cfg(feature = "chaos")]
    fn chaos(&mut self, event: &Event) {
        use rand::Rng;
        let chaos = &self.context.chaos;
        if !chaos.poison_sensor_id.is_empty() && event.sensor_id == chaos.poison_sensor_id {
            injected_panic(format!(
                "chaos: poison event from sensor {} at position {}",
                event.sensor_id, event.position
            ));
        }
        if chaos.partition_panic_probability > 0.0 && self.chaos_rng.random::<f64>() < chaos.partition_panic_probability
        {
            injected_panic(format!(
                "chaos: injected panic in partition {} at position {}",
                self.partition, event.position
            ));
        }
    }

    fn score_fired(
        context: &PartitionContext,
        sensor_id: &CompactString,
        event_type: &CompactString,
        key: &mut KeyState,
        fired: impl Iterator<Item = Fired>,
        results: &mut Vec<WindowResult>,
        now_ms: i64,
    ) {
        let window_kind = key.windows.kind();
        for window in fired {
            let features = window.features;
            let scorer = context.scoring.scorer(event_type);
            let score = if window.is_update() {
                scorer.rescore(&key.scorer, &features)
            } else {
                scorer.score(&mut key.scorer, &features)
            };
            let (anomaly, severity) = context.scoring.classify(score.value);
            results.push(WindowResult {
                sensor_id: sensor_id.clone(),
                event_type: event_type.clone(),
                window_kind,
                window_start_ms: features.start_ms,
                window_end_ms: features.end_ms,
                event_count: features.count,
                avg_value: features.mean,
                min_value: features.min,
                max_value: features.max,
                stddev: features.stddev,
                prediction_score: score.value,
                anomaly,
                severity,
                revision: window.revision,
                explanation: score.explanation,
                fired_at_ms: now_ms,
                supersedes: window.supersedes,
            });
        }
    }

    fn advance_clock(&mut self, now_ms: i64) {
        let previous = self.clock_ms;
        self.clock_ms = self.clock_ms.max(now_ms);
        self.sweep_if_due(previous);
    }

    /// Flush idle keys whenever the ingest clock crosses a sweep boundary. The decision
    /// depends only on the clock, so a replay sweeps at the same points.
    fn sweep_if_due(&mut self, previous_clock: i64) {
        let interval = sweep_interval(&self.context.windowing.default);
        if previous_clock != i64::MIN && previous_clock.div_euclid(interval) == self.clock_ms.div_euclid(interval) {
            return;
        }
        let context = Arc::clone(&self.context);
        let windowing = &context.windowing;
        let clock_ms = self.clock_ms;
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (sensor_id, event_type, key) in self.keys.iter_mut() {
            let spec = windowing.spec(event_type);
            if key.windows.is_idle(spec, clock_ms) {
                key.windows.flush(spec, &mut self.fired);
                key.dirty = true;
                Self::score_fired(
                    &self.context,
                    sensor_id,
                    event_type,
                    key,
                    self.fired.drain(..),
                    &mut self.results,
                    now_ms,
                );
            }
        }
        self.check_absence(now_ms);
        self.evict_idle_keys();
    }

    /// Raise `absence` alerts for keys silent past a rule's `after`, by the partition's
    /// event time or by its ingest clock.
    fn check_absence(&mut self, now_ms: i64) {
        let rules = self.context.rules.current();
        if !rules.has_absence() {
            return;
        }
        let (clock_ms, max_event_ms) = (self.clock_ms, self.max_event_ms);
        for (sensor_id, event_type, key) in self.keys.iter_mut() {
            let (last_event_ms, _) = key.windows.horizon();
            let last_ingest_ms = key.windows.last_ingest_ms();
            if last_event_ms == i64::MIN || last_ingest_ms == i64::MIN {
                continue;
            }
            let silence = Silence {
                last_event_ms,
                by_event_time_ms: max_event_ms.saturating_sub(last_event_ms),
                by_ingest_time_ms: clock_ms.saturating_sub(last_ingest_ms),
            };
            let (state, dirty) = self.rule_states.entry(sensor_id.clone()).or_default();
            *dirty |= rules.on_silence(state, sensor_id, event_type, silence, now_ms, &mut self.alerts);
            if state.is_empty() && !*dirty {
                self.rule_states.remove(sensor_id);
            }
        }
    }

    /// Evaluate the alert rules on the windows that fired for the first time.
    fn evaluate_rules(&mut self, results: &[WindowResult]) {
        let rules = self.context.rules.current();
        if rules.is_empty() && self.rule_states.is_empty() {
            return; // (with state left, alerts of rules a reload removed still resolve)
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        for result in results.iter().filter(|result| result.revision == 0) {
            match self.rule_states.get_mut(&result.sensor_id) {
                Some((state, dirty)) => *dirty |= rules.on_window(state, result, now_ms, &mut self.alerts),
                None => {
                    // Most sensors have no rule state: make one only when a rule keeps some.
                    let mut state = SensorRules::default();
                    let changed = rules.on_window(&mut state, result, now_ms, &mut self.alerts);
                    if changed || !state.is_empty() {
                        self.rule_states.insert(result.sensor_id.clone(), (state, true));
                    }
                }
            }
        }
    }

    /// Keys without events for `pipeline.key_ttl` and no open window leave memory and
    /// the checkpoints; a tombstone keeps where their windows stood for
    /// `pipeline.key_tombstone_ttl`.
    fn evict_idle_keys(&mut self) {
        let Some(ttl_ms) = self.context.key_limits.ttl_ms else {
            return;
        };
        let clock_ms = self.clock_ms;
        let expired = |key: &KeyState| {
            key.windows.open_windows() == 0
                && key.windows.last_ingest_ms() != i64::MIN
                && clock_ms.saturating_sub(key.windows.last_ingest_ms()) >= ttl_ms
        };
        let evicted = self.keys.remove_where(expired);
        for (sensor_id, event_type, key) in evicted {
            let (max_event_ms, closed_before_ms) = key.windows.horizon();
            let tombstone = Tombstone { max_event_ms, closed_before_ms, evicted_at_ms: clock_ms };
            self.tombstones.insert(stable_key_hash(&sensor_id, &event_type), tombstone);
            self.deleted.push((sensor_id, event_type));
            self.metrics.keys_evicted.inc();
        }
        self.tombstones.expire(clock_ms.saturating_sub(self.context.key_limits.tombstone_ttl_ms));
        self.metrics.open_keys.set(self.keys.len() as i64);
    }

    /// Fire every open window (end of a bounded input).
    fn flush_all(&mut self) {
        let context = Arc::clone(&self.context);
        let windowing = &context.windowing;
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (sensor_id, event_type, key) in self.keys.iter_mut() {
            let spec = windowing.spec(event_type);
            if key.windows.open_windows() > 0 {
                key.windows.flush(spec, &mut self.fired);
                key.dirty = true;
                Self::score_fired(
                    &self.context,
                    sensor_id,
                    event_type,
                    key,
                    self.fired.drain(..),
                    &mut self.results,
                    now_ms,
                );
            }
        }
    }

    /// The span of a traced batch: continues the first of `parents`, links the others.
    fn batch_span(&self, events: usize, parents: &[crate::telemetry::TraceContext]) -> tracing::Span {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "partition.batch",
            trace_id = tracing::field::Empty,
            partition = self.partition,
            events
        );
        crate::telemetry::follow(&span, parents);
        span
    }

    /// Hand results and dead letters to the sinks. A sink that cannot be reached fails
    /// the partition: it restarts from its checkpoint and replays, so nothing is lost.
    fn emit(&mut self) -> Result<(), ActorProcessingErr> {
        self.publish_counters();
        if !self.results.is_empty() {
            let results = std::mem::take(&mut self.results);
            let metrics = &self.context.metrics;
            let mut anomalies = 0u64;
            for result in &results {
                if result.revision == 0 {
                    self.metrics.fired.inc();
                    self.windows_fired += 1;
                } else {
                    self.metrics.updates.inc();
                }
                if result.anomaly && result.revision == 0 {
                    anomalies += 1;
                    metrics.anomalies.get_or_create(&SeverityLabels { severity: result.severity.as_str() }).inc();
                }
            }
            let trace = self
                .batch_span
                .as_ref()
                .and_then(|batch| crate::telemetry::window_fire(batch, self.partition, &results, anomalies));
            self.evaluate_rules(&results);
            self.context.sinks.send_results(results, trace)?;
        }
        if !self.alerts.is_empty() {
            let alerts = std::mem::take(&mut self.alerts);
            for alert in &alerts {
                self.context
                    .metrics
                    .alerts
                    .get_or_create(&crate::metrics::AlertLabels {
                        rule: alert.rule.to_string(),
                        state: alert.state.as_str(),
                    })
                    .inc();
            }
            self.context.sinks.send_alerts(alerts)?;
        }
        if !self.dead_letters.is_empty() {
            let letters = std::mem::take(&mut self.dead_letters);
            self.context.sinks.send_store(StoreMsg::DeadLetters(letters))?;
        }
        Ok(())
    }

    /// Send an incremental checkpoint (keys changed since the last one) to the store
    /// sink, behind every result emitted so far.
    fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        for (shard, entries) in self.tombstones.take_dirty() {
            let sensor_id = CompactString::from(shard.to_string());
            if entries.is_empty() {
                self.deleted.push((sensor_id, TOMBSTONE_TYPE.into()));
            } else {
                let state = encode_state(&entries)
                    .map_err(|error| format!("partition {}: cannot serialize tombstones: {error}", self.partition))?;
                self.tombstone_upserts.push(KeyStateBlob { sensor_id, event_type: TOMBSTONE_TYPE.into(), state });
            }
        }
        for (sensor_id, (state, dirty)) in self.rule_states.iter_mut() {
            if !*dirty {
                continue;
            }
            *dirty = false;
            if state.is_empty() {
                self.deleted.push((sensor_id.clone(), RULES_TYPE.into()));
            } else {
                let state = encode_state(&*state)
                    .map_err(|error| format!("partition {}: cannot serialize rule state: {error}", self.partition))?;
                self.tombstone_upserts.push(KeyStateBlob {
                    sensor_id: sensor_id.clone(),
                    event_type: RULES_TYPE.into(),
                    state,
                });
            }
        }
        self.rule_states.retain(|_, (state, _)| !state.is_empty());
        let unchanged = self.last_checkpoint_position == Some(self.next_position)
            && self.deleted.is_empty()
            && self.tombstone_upserts.is_empty()
            && !self.keys.values().any(|key| key.dirty);
        if unchanged {
            // The previous checkpoint already covers everything; do not queue another
            // behind it (a failing sink would otherwise collect one per interval).
            return Ok(());
        }
        let mut upserts = std::mem::take(&mut self.tombstone_upserts);
        for (sensor_id, event_type, key) in self.keys.iter_mut() {
            if key.dirty {
                let state = encode_state(&*key)
                    .map_err(|error| format!("partition {}: cannot serialize key state: {error}", self.partition))?;
                upserts.push(KeyStateBlob { sensor_id: sensor_id.clone(), event_type: event_type.clone(), state });
                key.dirty = false;
            }
        }
        if !self.deleted.is_empty() {
            // A key evicted and back since the last checkpoint is written, not deleted.
            let written: std::collections::HashSet<(&str, &str)> =
                upserts.iter().map(|blob| (blob.sensor_id.as_str(), blob.event_type.as_str())).collect();
            self.deleted
                .retain(|(sensor_id, event_type)| !written.contains(&(sensor_id.as_str(), event_type.as_str())));
        }
        self.checkpoint_id += 1;
        self.open_windows = self.keys.values().map(|key| key.windows.open_windows()).sum();
        let checkpoint = CheckpointData {
            partition: self.partition,
            partitions: self.context.partitions,
            next_position: self.next_position,
            clock_ms: self.clock_ms,
            checkpoint_id: self.checkpoint_id,
            taken_at_ms: chrono::Utc::now().timestamp_millis(),
            owner_epoch: self.owner_epoch,
            counters: self.counters,
            upserts,
            deletes: std::mem::take(&mut self.deleted),
        };
        self.context.sinks.send_checkpoint(checkpoint)?;
        self.last_checkpoint_position = Some(self.next_position);
        self.events_since_checkpoint = 0;
        Ok(())
    }

    fn status(&mut self) -> PartitionStatus {
        self.open_windows = self.keys.values().map(|key| key.windows.open_windows()).sum();
        PartitionStatus {
            partition: self.partition,
            open_keys: self.keys.len(),
            open_windows: self.open_windows,
            next_position: self.next_position,
            windows_fired: self.windows_fired,
            last_checkpoint_id: self.checkpoint_id,
            counters: self.counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Config;

    /// A store sink that reports what it receives (checkpoints complete at once).
    struct FakeStore;

    impl Actor for FakeStore {
        type Msg = StoreMsg;
        type State = mpsc::UnboundedSender<StoreMsg>;
        type Arguments = mpsc::UnboundedSender<StoreMsg>;

        async fn pre_start(
            &self,
            _myself: ActorRef<StoreMsg>,
            sender: mpsc::UnboundedSender<StoreMsg>,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(sender)
        }

        async fn handle(
            &self,
            _myself: ActorRef<StoreMsg>,
            message: StoreMsg,
            sender: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = sender.send(message);
            Ok(())
        }
    }

    struct Harness {
        actor: ActorRef<PartitionMsg>,
        progress: Arc<SlotProgress>,
        store: mpsc::UnboundedReceiver<StoreMsg>,
    }

    async fn harness(restored: Option<RestoredPartition>) -> Harness {
        let config = Config::embedded().expect("defaults");
        let (sender, store) = mpsc::unbounded_channel();
        let (fake, _) = Actor::spawn(None, FakeStore, sender).await.expect("fake store");
        let sinks = Arc::new(Sinks::new());
        sinks.set_store(Some(fake));
        let context = Arc::new(PartitionContext {
            limits: crate::ingest::ParseLimits::default(),
            raw_source: Some(RawSource {
                source: crate::messages::Source::Kafka,
                origin: "topic".into(),
                rejects: None,
            }),
            partitions: 1,
            windowing: Windowing::from_config(&config.pipeline),
            scoring: crate::scoring::Scoring::from_config(&config.scoring),
            checkpoint_interval: Duration::from_secs(5),
            checkpoint_max_events: 0,
            metrics: Arc::new(Metrics::new()),
            sinks,
            chaos: config.chaos.clone(),
            key_limits: crate::actors::partition::KeyLimits::from_config(&config.pipeline),
            rules: Arc::new(RulesHandle::new(crate::rules::Rules::from_config(&config.rules))),
        });
        let progress = Arc::new(SlotProgress::default());
        let args = PartitionArgs {
            partition: 0,
            context,
            progress: Arc::clone(&progress),
            restored,
            owner_epoch: 7,
            checkpoint_boost: None,
        };
        let (actor, _) = Actor::spawn(None, PartitionActor, args).await.expect("partition actor");
        Harness { actor, progress, store }
    }

    /// Let spawned tasks run (the clock is paused: this does not move it).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn raw(records: &[(Position, &str)]) -> RawBatch {
        let mut batch = RawBatch::with_capacity(records.len());
        for (position, payload) in records {
            batch.push(*position, 1_767_225_600_000, payload.as_bytes(), Some(b"key"));
        }
        batch
    }

    /// The next checkpoint the store receives.
    async fn next_checkpoint(store: &mut mpsc::UnboundedReceiver<StoreMsg>) -> CheckpointData {
        loop {
            match store.recv().await {
                Some(StoreMsg::Checkpoint(checkpoint)) => return *checkpoint,
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoints_follow_the_interval_on_a_paused_clock() {
        let mut harness = harness(None).await;
        settle().await;
        let event = r#"{"sensorId":"s","eventType":"t","value":1,"timestamp":1767225600000}"#;
        harness.actor.send_message(PartitionMsg::Raw(raw(&[(0, event)]))).expect("sent");
        settle().await;
        let mut next = tokio_test::task::spawn(next_checkpoint(&mut harness.store));
        tokio_test::assert_pending!(next.poll(), "nothing before the interval");
        tokio::time::advance(Duration::from_millis(4_900)).await;
        settle().await;
        tokio_test::assert_pending!(next.poll(), "4.9 s: still nothing");
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        let checkpoint = tokio_test::assert_ready!(next.poll(), "one checkpoint at 5 s");
        assert_eq!(checkpoint.next_position, 1);
        assert_eq!(checkpoint.owner_epoch, 7, "fenced with the actor's epoch");
        drop(next);
        // Nothing changed since: the next interval sends nothing.
        let mut next = tokio_test::task::spawn(next_checkpoint(&mut harness.store));
        tokio::time::advance(Duration::from_secs(5)).await;
        settle().await;
        tokio_test::assert_pending!(next.poll(), "an unchanged state is not checkpointed again");
    }

    #[tokio::test(start_paused = true)]
    async fn every_position_is_accounted_for() {
        let mut harness = harness(None).await;
        let good = r#"{"sensorId":"s","eventType":"t","value":1,"timestamp":1767225600000}"#;
        // A Kafka partition read from offset 100: a good event, a malformed one, a gap
        // reported by the source, an unreported gap, then a quarantined poison event.
        harness
            .actor
            .send_message(PartitionMsg::Raw(raw(&[(100, good), (101, "{broken"), (102, good)])))
            .expect("sent");
        harness
            .actor
            .send_message(PartitionMsg::NoEvent(NoEvent {
                from: 103,
                to: 110,
                kind: NoEventKind::Skipped,
                letter: None,
            }))
            .expect("sent");
        harness.actor.send_message(PartitionMsg::Raw(raw(&[(112, good)]))).expect("sent");
        harness.progress.quarantine_for_test(113, "crashed three times".into());
        harness.actor.send_message(PartitionMsg::Raw(raw(&[(113, good), (114, good)]))).expect("sent");
        harness.actor.send_message(PartitionMsg::Checkpoint).expect("sent");
        settle().await;
        let status = harness.progress.status().expect("published");
        let counters = status.counters;
        assert_eq!(counters.base_position, 100, "accounting starts at the first offset read");
        assert_eq!(status.next_position, 115);
        assert_eq!(
            (counters.events_processed, counters.dead_lettered, counters.skipped),
            (4, 2, 9),
            "processed 100, 102, 112, 114; dead-lettered 101 and 113; skipped 103..110 and 110..112"
        );
        assert_eq!(status.next_position - counters.base_position, counters.accounted());
        let mut reasons = Vec::new();
        while let Ok(message) = harness.store.try_recv() {
            if let StoreMsg::DeadLetters(letters) = message {
                reasons.extend(letters.into_iter().map(|l| (l.position, l.reason)));
            }
        }
        assert_eq!(reasons, vec![(Some(101), RejectReason::Unparsable), (Some(113), RejectReason::Poison)]);
    }

    /// Checkpoints written in format versions 1 (bare postcard, before the header), 2
    /// (tumbling windows only) and 3 (the `context` model's tables unpacked) are restored like one written today: the same state, the
    /// same results afterwards.
    #[tokio::test]
    async fn state_of_the_previous_checkpoint_format_is_restored() {
        let events = |range: std::ops::Range<u64>| {
            let records: Vec<(Position, String)> = range
                .map(|i| {
                    let line = format!(
                        r#"{{"sensorId":"s-{}","eventType":"t","value":{},"timestamp":{}}}"#,
                        i % 3,
                        (i * 7) % 11,
                        1_767_225_600_000 + i as i64 * 1_000
                    );
                    (i, line)
                })
                .collect();
            records
        };
        let as_raw = |records: &[(Position, String)]| {
            let refs: Vec<(Position, &str)> = records.iter().map(|(p, l)| (*p, l.as_str())).collect();
            raw(&refs)
        };
        let mut first = harness(None).await;
        first.actor.send_message(PartitionMsg::Raw(as_raw(&events(0..40)))).expect("sent");
        first.actor.send_message(PartitionMsg::Checkpoint).expect("sent");
        let checkpoint = next_checkpoint(&mut first.store).await;
        assert!(checkpoint.upserts.iter().all(|blob| blob.state.starts_with(b"TM\x04")), "written as version 4");
        // The same state as versions 1, 2 and 3 wrote it.
        let legacy = |state: &[u8], version: u8| -> Vec<u8> {
            let state = decode_key_state(state).expect("version 4");
            let scorer = ScorerStateV3::from(&state.scorer);
            if version == 3 {
                let bytes = postcard::to_allocvec(&KeyStateV3 { windows: state.windows, scorer }).expect("encoded");
                return [b"TM\x03".as_slice(), &bytes].concat();
            }
            let Windows::Tumbling(windows) = state.windows else { panic!("default windows are tumbling") };
            let bytes = postcard::to_allocvec(&KeyStateV2 { windows, scorer }).expect("encoded");
            if version == 1 { bytes } else { [b"TM\x02".as_slice(), &bytes].concat() }
        };
        let restore = |version: u8| RestoredPartition {
            next_position: checkpoint.next_position,
            clock_ms: checkpoint.clock_ms,
            checkpoint_id: checkpoint.checkpoint_id,
            counters: checkpoint.counters,
            keys: checkpoint
                .upserts
                .iter()
                .map(|blob| KeyStateBlob {
                    sensor_id: blob.sensor_id.clone(),
                    event_type: blob.event_type.clone(),
                    state: if version == STATE_FORMAT { blob.state.clone() } else { legacy(&blob.state, version) },
                })
                .collect(),
        };
        let mut outcomes = Vec::new();
        for version in [STATE_FORMAT, 3, 2, 1] {
            let mut harness = harness(Some(restore(version))).await;
            harness.actor.send_message(PartitionMsg::Raw(as_raw(&events(40..120)))).expect("sent");
            harness.actor.send_message(PartitionMsg::Checkpoint).expect("sent");
            let mut results = Vec::new();
            let checkpoint = loop {
                match tokio::time::timeout(Duration::from_secs(5), harness.store.recv()).await {
                    Ok(Some(StoreMsg::Results(batch, _))) => results.extend(batch),
                    Ok(Some(StoreMsg::Checkpoint(checkpoint))) => break *checkpoint,
                    Ok(Some(_)) => {}
                    other => panic!("no checkpoint: {}", other.is_ok()),
                }
            };
            // Compared without what versions 1 to 3 did not keep (the first window's
            // start, restored as unknown): written as version 3 writes them.
            let mut states: Vec<_> = checkpoint
                .upserts
                .iter()
                .map(|b| {
                    let state = decode_key_state(&b.state).expect("decoded");
                    let scorer = ScorerStateV3::from(&state.scorer);
                    (
                        b.sensor_id.clone(),
                        postcard::to_allocvec(&KeyStateV3 { windows: state.windows, scorer }).expect("encoded"),
                    )
                })
                .collect();
            states.sort();
            let fired: Vec<_> =
                results.iter().map(|r| (r.sensor_id.clone(), r.window_start_ms, r.event_count)).collect();
            assert!(!fired.is_empty(), "windows fired after the restore");
            outcomes.push((fired, states, checkpoint.counters));
        }
        assert_eq!(outcomes[0], outcomes[1], "version 3 restores to the same state as version 4");
        assert_eq!(outcomes[0], outcomes[2], "version 2 restores to the same state as version 4");
        assert_eq!(outcomes[0], outcomes[3], "version 1 restores to the same state as version 4");
        let unknown = KeyStateBlob { sensor_id: "s".into(), event_type: "t".into(), state: b"TM\x09xx".to_vec() };
        let error = decode_key_state(&unknown.state).expect_err("a newer format is refused");
        assert!(error.contains("version 9"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_state_continues_its_accounting() {
        let restored = RestoredPartition {
            next_position: 50,
            clock_ms: 0,
            checkpoint_id: 3,
            counters: PartitionCounters {
                base_position: 10,
                events_processed: 38,
                dead_lettered: 2,
                ..Default::default()
            },
            keys: Vec::new(),
        };
        let harness = harness(Some(restored)).await;
        let good = r#"{"sensorId":"s","eventType":"t","value":1,"timestamp":1767225600000}"#;
        // A re-read from before the checkpoint is skipped, not counted twice.
        harness.actor.send_message(PartitionMsg::Raw(raw(&[(48, good), (49, good), (50, good)]))).expect("sent");
        settle().await;
        let status = harness.progress.status().expect("published");
        assert_eq!(status.next_position, 51);
        assert_eq!(status.counters.events_processed, 39);
        assert_eq!(status.next_position - status.counters.base_position, status.counters.accounted());
    }
}
