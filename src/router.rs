//! The router and embedded ingest log: assigns every accepted event its partition and
//! source position, keeps each partition's events since its last complete checkpoint
//! (the replay buffer), and delivers them to the partition's current actor.
//!
//! The partition supervisor owns the routing table kept here: only it attaches and
//! detaches actors, so no sender ever holds a stale `ActorRef`. While a partition is
//! restarting its events are still logged; on attach the new actor receives, in order,
//! everything after its checkpoint and then the new events.
//!
//! One memory bound serves every mode: the events of a partition since its last
//! complete checkpoint (`pipeline.max_buffered_events` / partitions). Embedded ingestion
//! refuses a request that would pass it ([`PartitionRouter::submit`]: HTTP answers 503);
//! a Kafka source pauses the partition ([`PartitionRouter::unconfirmed`]). At a quarter
//! of the bound the partition is asked to checkpoint, so the bound is reached only when
//! checkpoints stop completing (a store outage).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use ractor::ActorRef;

use crate::ingest::log::{EncodedEvents, IngestLog, Recovered};
use crate::messages::{Event, EventBatch, NoEvent, PartitionId, PartitionMsg, Position};
use crate::metrics::{Metrics, PartitionLabels};
use crate::routing::partition_for;

/// "Not processing any event" for [`SlotProgress::processing`].
pub const IDLE: u64 = u64::MAX;

/// Progress a partition actor publishes without messaging (read by the supervisor to
/// find a poison event, and by bounded readers for credits), and the positions the
/// supervisor quarantined.
#[derive(Debug)]
pub struct SlotProgress {
    /// Position of the event being processed, or [`IDLE`].
    pub processing: AtomicU64,
    /// Next position the actor will process: all before it are done.
    pub processed: AtomicU64,
    /// Poison events: positions whose event crashed the partition too often, with the
    /// last failure. The actor dead-letters them instead of processing them.
    quarantine: Mutex<BTreeMap<Position, String>>,
    has_quarantine: AtomicBool,
    /// The actor's status, published after every batch, so `/api/status` never waits
    /// behind the events queued in its mailbox.
    status: Mutex<Option<crate::messages::PartitionStatus>>,
}

impl Default for SlotProgress {
    fn default() -> Self {
        Self {
            processing: AtomicU64::new(IDLE),
            processed: AtomicU64::new(0),
            quarantine: Mutex::new(BTreeMap::new()),
            has_quarantine: AtomicBool::new(false),
            status: Mutex::new(None),
        }
    }
}

impl SlotProgress {
    /// The status the partition's actor last published (`None` before its first).
    pub fn status(&self) -> Option<crate::messages::PartitionStatus> {
        self.status.lock().clone()
    }

    pub fn publish_status(&self, status: crate::messages::PartitionStatus) {
        *self.status.lock() = Some(status);
    }

    /// The failure that got `position` quarantined, if it was (cheap when none is).
    #[inline]
    pub fn quarantined(&self, position: Position) -> Option<String> {
        if !self.has_quarantine.load(Ordering::Acquire) {
            return None;
        }
        self.quarantine.lock().get(&position).cloned()
    }

    /// Quarantine `position` directly (actor tests, without a router).
    #[cfg(test)]
    pub fn quarantine_for_test(&self, position: Position, failure: String) {
        self.quarantine(position, failure);
    }

    fn quarantine(&self, position: Position, failure: String) {
        self.quarantine.lock().insert(position, failure);
        self.has_quarantine.store(true, Ordering::Release);
    }

    /// Forget quarantined positions a complete checkpoint covers.
    fn release_quarantine(&self, next_position: Position) {
        if !self.has_quarantine.load(Ordering::Acquire) {
            return;
        }
        let mut quarantine = self.quarantine.lock();
        quarantine.retain(|&position, _| position >= next_position);
        self.has_quarantine.store(!quarantine.is_empty(), Ordering::Release);
    }
}

/// Where the partitions' events are kept until a checkpoint covers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogMode {
    /// Embedded ingestion: the router is the log and replays it after a restart.
    Replay,
    /// The source is the log (Kafka): a restarted partition is read again from its
    /// checkpoint by the source; the router only routes and counts.
    External,
    /// A bounded input read by its own reader (`tidemark replay` of a file): nothing to
    /// survive, only the events in flight are bounded.
    InFlight,
}

enum LogEntry {
    Events(EventBatch),
    /// The ingest clock reached `now_ms` before the event at `position`.
    Tick {
        position: Position,
        now_ms: i64,
    },
}

impl LogEntry {
    /// Whether the entry is fully covered by a checkpoint at `next_position`.
    fn covered_by(&self, next_position: Position) -> bool {
        match self {
            Self::Events(batch) => batch.last().is_none_or(|event| event.position < next_position),
            Self::Tick { position, .. } => *position < next_position,
        }
    }

    fn events(&self) -> usize {
        match self {
            Self::Events(batch) => batch.len(),
            Self::Tick { .. } => 0,
        }
    }
}

struct SlotState {
    actor: Option<ActorRef<PartitionMsg>>,
    /// Next position to assign (embedded) or after the last one delivered (Kafka).
    next_position: Position,
    /// The partition's ingest clock (embedded): events and ticks are stamped with it
    /// under this lock, so it never goes back in log order and an idle decision never
    /// sees a time newer than an event already accepted.
    clock_ms: i64,
    log: VecDeque<LogEntry>,
    buffered: usize,
    /// `next_position` of the last complete checkpoint.
    checkpointed: Position,
    last_checkpoint_id: u64,
    /// A checkpoint was requested because the buffer passed half its share.
    pressure_checkpoint_requested: bool,
    /// Restarts of this partition's actor (for `/api/status`).
    restarts: u64,
}

struct Slot {
    state: Mutex<SlotState>,
    progress: Arc<SlotProgress>,
    /// `next_position` of the last complete checkpoint, for waiters.
    checkpointed: tokio::sync::watch::Sender<Position>,
}

/// Why events were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("partition {partition} has {buffered} events waiting for a checkpoint (limit {limit}); retry later")]
    Backpressure { partition: PartitionId, buffered: usize, limit: usize, retry_after: Duration },
    #[error(
        "the request puts {events} events into partition {partition}, which holds at most {limit} unconfirmed \
         events (pipeline.max_buffered_events / pipeline.partitions); split it into smaller requests"
    )]
    TooLarge { partition: PartitionId, events: usize, limit: usize },
    #[error("tidemark is shutting down")]
    Closed,
}

/// One partition's view for `/api/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotStatus {
    pub partition: PartitionId,
    pub live: bool,
    pub restarts: u64,
    pub next_position: Position,
    pub processed_position: Position,
    pub in_flight_events: u64,
    pub replay_buffer_events: usize,
    /// Events since the last complete checkpoint (the memory bound counts these).
    pub unconfirmed_events: u64,
    pub replay_buffer_limit: usize,
    pub last_checkpoint_position: Position,
    pub last_checkpoint_id: u64,
}

pub struct PartitionRouter {
    slots: Vec<Slot>,
    /// The on-disk ingest log (embedded mode with `ingest.durability` fsync or os).
    disk: Option<Arc<IngestLog>>,
    /// Buffer share of each partition.
    limit: usize,
    mode: LogMode,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl PartitionRouter {
    pub fn new(partitions: u32, max_buffered_events: usize, mode: LogMode, metrics: Arc<Metrics>) -> Self {
        let partitions = partitions.max(1);
        let slots = (0..partitions)
            .map(|_| Slot {
                state: Mutex::new(SlotState {
                    actor: None,
                    next_position: 0,
                    clock_ms: i64::MIN,
                    log: VecDeque::new(),
                    buffered: 0,
                    checkpointed: 0,
                    last_checkpoint_id: 0,
                    pressure_checkpoint_requested: false,
                    restarts: 0,
                }),
                progress: Arc::new(SlotProgress::default()),
                checkpointed: tokio::sync::watch::Sender::new(0),
            })
            .collect();
        Self {
            slots,
            disk: None,
            limit: Self::share(max_buffered_events, partitions),
            mode,
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Make `log` the router's durable log, and take back what it held: the partitions
    /// continue after the last logged position and replay the logged entries their
    /// checkpoints do not cover when their actors attach.
    pub fn with_disk_log(mut self, log: Arc<IngestLog>, recovered: Vec<Vec<Recovered>>) -> Self {
        for (slot, entries) in self.slots.iter().zip(recovered) {
            let mut guard = slot.state.lock();
            for entry in entries {
                match entry {
                    Recovered::Events(events) => {
                        let Some(last) = events.last() else { continue };
                        guard.next_position = guard.next_position.max(last.position + 1);
                        guard.clock_ms = guard.clock_ms.max(last.ingest_ms);
                        guard.buffered += events.len();
                        guard.log.push_back(LogEntry::Events(Arc::new(events)));
                    }
                    Recovered::Tick { position, now_ms } => {
                        guard.clock_ms = guard.clock_ms.max(now_ms);
                        if let Some(LogEntry::Tick { position: last, .. }) = guard.log.back()
                            && *last == position
                        {
                            guard.log.pop_back();
                        }
                        guard.log.push_back(LogEntry::Tick { position, now_ms });
                    }
                }
            }
            slot.progress.processed.store(guard.next_position, Ordering::Release);
        }
        self.disk = Some(log);
        self
    }

    /// The durable ingest log, if there is one.
    pub fn disk_log(&self) -> Option<&Arc<IngestLog>> {
        self.disk.as_ref()
    }

    /// Each partition's share of `pipeline.max_buffered_events`.
    pub fn share(max_buffered_events: usize, partitions: u32) -> usize {
        (max_buffered_events / partitions.max(1) as usize).max(16)
    }

    /// Events a partition may have since its last complete checkpoint.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn mode(&self) -> LogMode {
        self.mode
    }

    fn keeps_log(&self) -> bool {
        self.mode == LogMode::Replay
    }

    pub fn partitions(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn partition_of(&self, sensor_id: &str) -> PartitionId {
        partition_for(sensor_id, self.partitions())
    }

    pub fn progress(&self, partition: PartitionId) -> Arc<SlotProgress> {
        Arc::clone(&self.slot(partition).progress)
    }

    /// Whether `partition` is one of this router's partitions.
    pub fn contains(&self, partition: PartitionId) -> bool {
        (partition as usize) < self.slots.len()
    }

    fn slot(&self, partition: PartitionId) -> &Slot {
        // Callers pass partitions the router handed out or checked with `contains`; a
        // bad index is a bug, and the modulo keeps it from taking the process down.
        &self.slots[partition as usize % self.slots.len()]
    }

    /// Stop accepting events (graceful shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Accept `events` (all or none), assigning positions in arrival order per partition.
    pub fn submit(&self, events: Vec<Event>) -> Result<usize, SubmitError> {
        self.submit_logged(events).map(|(total, _)| total)
    }

    /// [`Self::submit`], also returning the ingest-log tickets to wait for before the
    /// events count as accepted (none without a disk log).
    pub fn submit_logged(&self, events: Vec<Event>) -> Result<(usize, Vec<(PartitionId, u64)>), SubmitError> {
        if self.is_closed() {
            return Err(SubmitError::Closed);
        }
        let total = events.len();
        if total == 0 {
            return Ok((0, Vec::new()));
        }
        let span = route_span(total);
        let _entered = span.enter();
        let trace = crate::telemetry::TraceContext::of(&span);
        let mut groups: Vec<Vec<Event>> = (0..self.slots.len()).map(|_| Vec::new()).collect();
        if self.slots.len() == 1 {
            groups[0] = events;
        } else {
            for event in events {
                let partition = self.partition_of(&event.sensor_id) as usize;
                groups[partition].push(event);
            }
        }
        // The log's encoding of the events, the costly part of an append, before any lock.
        let mut encoded: Vec<Option<EncodedEvents>> = groups
            .iter()
            .map(|group| (self.disk.is_some() && !group.is_empty()).then(|| EncodedEvents::new(group)))
            .collect();
        // Lock the involved partitions in index order (no deadlock), check every bound,
        // then append: a request is accepted whole or refused whole.
        let mut guards: Vec<(PartitionId, MutexGuard<'_, SlotState>)> = Vec::new();
        for (partition, group) in groups.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            if group.len() > self.limit {
                // No amount of waiting makes room for it: say so instead of "retry".
                return Err(SubmitError::TooLarge {
                    partition: partition as PartitionId,
                    events: group.len(),
                    limit: self.limit,
                });
            }
            let slot = &self.slots[partition];
            let guard = slot.state.lock();
            let pending = self.pending(&guard, slot);
            if pending + group.len() > self.limit && pending > 0 {
                self.request_checkpoint(partition as PartitionId, &guard);
                return Err(SubmitError::Backpressure {
                    partition: partition as PartitionId,
                    buffered: pending,
                    limit: self.limit,
                    retry_after: Duration::from_secs(1),
                });
            }
            guards.push((partition as PartitionId, guard));
        }
        let mut tickets = Vec::with_capacity(guards.len());
        for (partition, mut guard) in guards {
            let group = std::mem::take(&mut groups[partition as usize]);
            let encoded = encoded[partition as usize].take();
            if let Some(ticket) = self.append(partition, &mut guard, group, encoded, trace) {
                tickets.push((partition, ticket));
            }
        }
        if let Some(disk) = &self.disk
            && !tickets.is_empty()
        {
            disk.commit();
        }
        Ok((total, tickets))
    }

    /// Accept events already known to belong to `partition` (a file replay, which
    /// waits for [`Self::has_room`] itself).
    pub fn submit_to(&self, partition: PartitionId, events: Vec<Event>) {
        let mut guard = self.slot(partition).state.lock();
        let encoded = self.disk.as_ref().map(|_| EncodedEvents::new(&events));
        self.append(partition, &mut guard, events, encoded, None);
        if let Some(disk) = &self.disk {
            disk.commit();
        }
    }

    /// Assign positions and ingest times, deliver to the live actor, keep for replay
    /// (and in the disk log: returns the ticket to wait for).
    fn append(
        &self,
        partition: PartitionId,
        guard: &mut SlotState,
        mut group: Vec<Event>,
        encoded: Option<EncodedEvents>,
        trace: Option<crate::telemetry::TraceContext>,
    ) -> Option<u64> {
        if self.keeps_log() {
            guard.clock_ms = guard.clock_ms.max(chrono::Utc::now().timestamp_millis());
        }
        for event in &mut group {
            event.position = guard.next_position;
            guard.next_position += 1;
            if self.keeps_log() {
                event.ingest_ms = guard.clock_ms;
            }
        }
        let batch: EventBatch = Arc::new(group);
        let ticket = match (&self.disk, &encoded) {
            (Some(disk), Some(encoded)) => Some(disk.append_events(partition, &batch, encoded)),
            _ => None,
        };
        if let Some(actor) = &guard.actor {
            // A failed send means the actor just died: the supervisor replays the log.
            let _ = actor.send_message(PartitionMsg::Events(Arc::clone(&batch), trace));
        }
        if self.keeps_log() {
            guard.buffered += batch.len();
            guard.log.push_back(LogEntry::Events(batch));
            self.metrics.buffered_events.get_or_create(&PartitionLabels { partition }).set(guard.buffered as i64);
        }
        self.checkpoint_if_pressed(guard);
        ticket
    }

    /// Past a quarter of the bound, ask the partition for a checkpoint (once until one
    /// completes): it completes long before the bound is reached unless the store is
    /// down, so a healthy pipeline never waits for it.
    fn checkpoint_if_pressed(&self, guard: &mut SlotState) {
        if self.mode == LogMode::InFlight || guard.pressure_checkpoint_requested {
            return;
        }
        let pending = match self.mode {
            LogMode::Replay => guard.buffered as u64,
            _ => guard.next_position.saturating_sub(guard.checkpointed),
        };
        if pending * 4 >= self.limit as u64 {
            guard.pressure_checkpoint_requested = true;
            if let Some(actor) = &guard.actor {
                let _ = actor.send_message(PartitionMsg::Checkpoint);
            }
        }
    }

    /// Deliver events that carry their source positions already (Kafka offsets), in
    /// order, to the partition's actor. Without an actor nothing is delivered and
    /// nothing advances: the source must read them again once an actor is attached (it
    /// is positioned at the actor's checkpoint then). Returns whether they were handed
    /// over.
    pub fn deliver(&self, partition: PartitionId, events: Vec<Event>) -> bool {
        let Some(last) = events.last().map(|event| event.position) else {
            return true;
        };
        self.deliver_message(partition, last + 1, PartitionMsg::Events(Arc::new(events), None))
    }

    /// Deliver undecoded messages (see [`Self::deliver`]).
    pub fn deliver_raw(&self, partition: PartitionId, batch: crate::messages::RawBatch) -> bool {
        let Some(last) = batch.last_position() else {
            return true;
        };
        self.deliver_message(partition, last + 1, PartitionMsg::Raw(batch))
    }

    /// Deliver positions that carry no event (see [`Self::deliver`]).
    pub fn deliver_no_event(&self, partition: PartitionId, no_event: NoEvent) -> bool {
        let next = no_event.to;
        self.deliver_message(partition, next, PartitionMsg::NoEvent(no_event))
    }

    fn deliver_message(&self, partition: PartitionId, next: Position, message: PartitionMsg) -> bool {
        let mut guard = self.slot(partition).state.lock();
        let Some(actor) = &guard.actor else {
            return false;
        };
        if actor.send_message(message).is_err() {
            return false;
        }
        guard.next_position = guard.next_position.max(next);
        self.checkpoint_if_pressed(&mut guard);
        true
    }

    /// The source will deliver `partition` from `from`, the checkpoint its new actor
    /// starts from, again.
    pub fn rewind(&self, partition: PartitionId, from: Position) {
        let slot = self.slot(partition);
        let mut guard = slot.state.lock();
        guard.next_position = from;
        guard.checkpointed = from;
        guard.pressure_checkpoint_requested = false;
        slot.progress.processed.store(from, Ordering::Release);
    }

    /// Events delivered since the partition's last complete checkpoint: what a Kafka
    /// source bounds (it pauses the partition at [`Self::limit`]).
    pub fn unconfirmed(&self, partition: PartitionId) -> u64 {
        let guard = self.slot(partition).state.lock();
        guard.next_position.saturating_sub(guard.checkpointed)
    }

    /// Events delivered to the partition's actor and not yet processed.
    pub fn in_flight(&self, partition: PartitionId) -> u64 {
        let slot = self.slot(partition);
        let next = slot.state.lock().next_position;
        next.saturating_sub(slot.progress.processed.load(Ordering::Acquire))
    }

    /// Events accepted and not yet released: buffered for replay, since the last
    /// complete checkpoint, or (a file replay) in flight.
    fn pending(&self, state: &SlotState, slot: &Slot) -> usize {
        match self.mode {
            LogMode::Replay => state.buffered,
            LogMode::External => state.next_position.saturating_sub(state.checkpointed) as usize,
            LogMode::InFlight => {
                state.next_position.saturating_sub(slot.progress.processed.load(Ordering::Acquire)) as usize
            }
        }
    }

    fn request_checkpoint(&self, _partition: PartitionId, state: &SlotState) {
        if self.mode != LogMode::InFlight
            && let Some(actor) = &state.actor
        {
            let _ = actor.send_message(PartitionMsg::Checkpoint);
        }
    }

    /// Whether a partition can take `n` more events now (bounded readers poll this).
    pub fn has_room(&self, partition: PartitionId, n: usize) -> bool {
        let slot = self.slot(partition);
        let guard = slot.state.lock();
        let pending = self.pending(&guard, slot);
        pending == 0 || pending + n <= self.limit
    }

    /// Advance every partition's ingest clock (idle flushing while no events arrive).
    /// Ticks are logged like events so a replay flushes at the same points.
    pub fn tick(&self, now_ms: i64) {
        for (partition, slot) in self.slots.iter().enumerate() {
            let mut guard = slot.state.lock();
            guard.clock_ms = guard.clock_ms.max(now_ms);
            let now_ms = guard.clock_ms;
            let position = guard.next_position;
            if let Some(actor) = &guard.actor {
                let _ = actor.send_message(PartitionMsg::Tick { now_ms });
            }
            if self.keeps_log() {
                // Consecutive ticks at one position: only the latest matters.
                if let Some(LogEntry::Tick { position: last, .. }) = guard.log.back()
                    && *last == position
                {
                    guard.log.pop_back();
                }
                guard.log.push_back(LogEntry::Tick { position, now_ms });
                if let Some(disk) = &self.disk {
                    disk.append_tick(partition as PartitionId, position, now_ms);
                }
            }
        }
    }

    /// Send a control message to a partition's live actor; false if it has none.
    pub fn send(&self, partition: PartitionId, message: PartitionMsg) -> bool {
        let guard = self.slot(partition).state.lock();
        match &guard.actor {
            Some(actor) => actor.send_message(message).is_ok(),
            None => false,
        }
    }

    pub fn actor(&self, partition: PartitionId) -> Option<ActorRef<PartitionMsg>> {
        self.slot(partition).state.lock().actor.clone()
    }

    /// A checkpoint with `next_position` was committed: release the log before it.
    pub fn checkpoint_complete(&self, partition: PartitionId, next_position: Position, checkpoint_id: u64) {
        let labels = PartitionLabels { partition };
        let mut guard = self.slot(partition).state.lock();
        if next_position >= guard.checkpointed {
            guard.checkpointed = next_position;
            guard.last_checkpoint_id = checkpoint_id;
            self.slot(partition).checkpointed.send_replace(next_position);
        }
        self.metrics.checkpoints_completed.get_or_create(&labels).inc();
        self.slot(partition).progress.release_quarantine(next_position);
        if guard.actor.is_none() {
            // Restarting: the supervisor may be restoring an older checkpoint it read
            // before this commit, and replays from there. Keep the log until the new
            // actor's own checkpoint completes.
            return;
        }
        while let Some(entry) = guard.log.front() {
            if !entry.covered_by(next_position) {
                break;
            }
            let released = entry.events();
            guard.buffered -= released;
            guard.log.pop_front();
        }
        if let Some(disk) = &self.disk {
            disk.release(partition, next_position);
        }
        guard.pressure_checkpoint_requested = false;
        // Still past the threshold (events kept arriving while it was written): ask for
        // the next one now rather than on the next delivery, which a paused partition
        // would never make.
        self.checkpoint_if_pressed(&mut guard);
        self.metrics.buffered_events.get_or_create(&labels).set(guard.buffered as i64);
        self.metrics.checkpoint_position.get_or_create(&labels).set(i64::try_from(next_position).unwrap_or(i64::MAX));
    }

    // ---- used by the partition supervisor only ----

    /// Where positions continue after a process restart (from the stored checkpoint),
    /// and the ingest clock the checkpoint reached.
    pub fn start_at(&self, partition: PartitionId, next_position: Position, clock_ms: i64) {
        let slot = self.slot(partition);
        let mut guard = slot.state.lock();
        if guard.next_position < next_position {
            guard.next_position = next_position;
        }
        guard.checkpointed = guard.checkpointed.max(next_position);
        guard.clock_ms = guard.clock_ms.max(clock_ms);
        slot.progress.processed.store(guard.next_position, Ordering::Release);
    }

    /// Forget the partition's actor without counting a restart (its supervisor was
    /// replaced and the actor went with it).
    pub fn clear_actor(&self, partition: PartitionId) {
        let slot = self.slot(partition);
        slot.state.lock().actor = None;
        slot.progress.processing.store(IDLE, Ordering::Release);
    }

    /// The actor of `partition` stopped: log events without delivering them. Returns the
    /// position it was processing when it failed, if any.
    pub fn detach(&self, partition: PartitionId) -> Option<Position> {
        let slot = self.slot(partition);
        let mut guard = slot.state.lock();
        guard.actor = None;
        guard.restarts += 1;
        let processing = slot.progress.processing.swap(IDLE, Ordering::AcqRel);
        (processing != IDLE).then_some(processing)
    }

    /// Make `actor` the partition's actor: deliver the logged entries from `from`
    /// (its checkpoint), in order, then go live. Returns the number of events replayed.
    pub fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position) -> usize {
        let slot = self.slot(partition);
        let mut guard = slot.state.lock();
        slot.progress.processed.store(from, Ordering::Release);
        let mut replayed = 0;
        for entry in &guard.log {
            match entry {
                LogEntry::Events(batch) => {
                    let Some(last) = batch.last() else { continue };
                    if last.position < from {
                        continue;
                    }
                    let batch = if batch[0].position >= from {
                        Arc::clone(batch)
                    } else {
                        Arc::new(batch.iter().filter(|e| e.position >= from).cloned().collect())
                    };
                    replayed += batch.len();
                    let _ = actor.send_message(PartitionMsg::Events(batch, None));
                }
                LogEntry::Tick { position, now_ms } => {
                    if *position >= from {
                        let _ = actor.send_message(PartitionMsg::Tick { now_ms: *now_ms });
                    }
                }
            }
        }
        if guard.pressure_checkpoint_requested {
            let _ = actor.send_message(PartitionMsg::Checkpoint);
        }
        guard.actor = Some(actor);
        replayed
    }

    /// Quarantine the event at `position` (a poison event): the partition's actor
    /// dead-letters it with `failure` instead of processing it, whichever source
    /// delivers it again (the replay log, or Kafka from the checkpoint).
    pub fn quarantine(&self, partition: PartitionId, position: Position, failure: String) {
        self.slot(partition).progress.quarantine(position, failure);
    }

    pub fn status(&self, partition: PartitionId) -> SlotStatus {
        let slot = self.slot(partition);
        let guard = slot.state.lock();
        let processed = slot.progress.processed.load(Ordering::Acquire);
        SlotStatus {
            partition,
            live: guard.actor.is_some(),
            restarts: guard.restarts,
            next_position: guard.next_position,
            processed_position: processed,
            in_flight_events: guard.next_position.saturating_sub(processed),
            replay_buffer_events: guard.buffered,
            unconfirmed_events: guard.next_position.saturating_sub(guard.checkpointed),
            replay_buffer_limit: self.limit,
            last_checkpoint_position: guard.checkpointed,
            last_checkpoint_id: guard.last_checkpoint_id,
        }
    }

    /// Total events held for replay across partitions.
    pub fn buffered_total(&self) -> usize {
        self.slots.iter().map(|slot| slot.state.lock().buffered).sum()
    }
}

/// The router's span for a request, when the request is traced (a child of it).
fn route_span(events: usize) -> tracing::Span {
    if !crate::telemetry::enabled() || crate::telemetry::TraceContext::of(&tracing::Span::current()).is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(target: crate::telemetry::TARGET, "router.route", events)
}

/// Embedded ingestion that is only done once a complete checkpoint covers the events: for
/// acknowledgements that must mean "safe" when the replay buffer is not durable
/// (`ingest.durability = "memory"`, MQTT). A wait past 100 ms asks the partition for a
/// checkpoint instead of waiting for `checkpoint.interval`.
pub struct CheckpointedIngest(pub Arc<PartitionRouter>);

#[async_trait::async_trait]
impl crate::ingest::Ingest for CheckpointedIngest {
    async fn accept(&self, events: Vec<Event>) -> Result<(), crate::ingest::IngestRefusal> {
        let router = &self.0;
        let mut partitions: Vec<PartitionId> = events.iter().map(|e| router.partition_of(&e.sensor_id)).collect();
        partitions.sort_unstable();
        partitions.dedup();
        crate::ingest::Ingest::accept(router.as_ref(), events).await?;
        for partition in partitions {
            let slot = router.slot(partition);
            // Every event of this request is before the partition's next position now.
            let target = slot.state.lock().next_position;
            let mut checkpointed = slot.checkpointed.subscribe();
            let covered = |position: &Position| *position >= target;
            if tokio::time::timeout(Duration::from_millis(100), checkpointed.wait_for(covered)).await.is_err() {
                router.request_checkpoint(partition, &slot.state.lock());
                if checkpointed.wait_for(covered).await.is_err() {
                    return Err(crate::ingest::IngestRefusal::Closed);
                }
            }
        }
        Ok(())
    }
}

/// Embedded ingestion: the router is the log.
#[async_trait::async_trait]
impl crate::ingest::Ingest for PartitionRouter {
    async fn accept(&self, events: Vec<Event>) -> Result<(), crate::ingest::IngestRefusal> {
        use crate::ingest::IngestRefusal;
        match self.submit_logged(events) {
            Ok((_, tickets)) => match (&self.disk, tickets.is_empty()) {
                (Some(disk), false) => disk
                    .wait(tickets.iter().map(|&(_, ticket)| ticket).max().unwrap_or(0))
                    .await
                    .map_err(|error| IngestRefusal::Unavailable { reason: error.to_string() }),
                _ => Ok(()),
            },
            Err(SubmitError::Backpressure { partition, buffered, limit, retry_after }) => {
                Err(IngestRefusal::Backpressure { partition, buffered, limit, retry_after })
            }
            Err(SubmitError::TooLarge { partition, events, limit }) => {
                Err(IngestRefusal::TooLarge { partition, events, limit })
            }
            Err(SubmitError::Closed) => Err(IngestRefusal::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::NoEventKind;
    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::mpsc;

    /// A partition "actor" that reports what it is sent.
    struct Recorder;

    #[derive(Debug, PartialEq)]
    enum Seen {
        Events(Vec<Position>),
        NoEvent(Position, Position),
        Tick(i64),
        Checkpoint,
        Other,
    }

    impl Actor for Recorder {
        type Msg = PartitionMsg;
        type State = mpsc::UnboundedSender<Seen>;
        type Arguments = mpsc::UnboundedSender<Seen>;

        async fn pre_start(
            &self,
            _myself: ActorRef<PartitionMsg>,
            seen: mpsc::UnboundedSender<Seen>,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(seen)
        }

        async fn handle(
            &self,
            _myself: ActorRef<PartitionMsg>,
            message: PartitionMsg,
            seen: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = seen.send(match message {
                PartitionMsg::Events(batch, _) => Seen::Events(batch.iter().map(|e| e.position).collect()),
                PartitionMsg::NoEvent(no_event) => Seen::NoEvent(no_event.from, no_event.to),
                PartitionMsg::Tick { now_ms } => Seen::Tick(now_ms),
                PartitionMsg::Checkpoint => Seen::Checkpoint,
                _ => Seen::Other,
            });
            Ok(())
        }
    }

    async fn recorder() -> (ActorRef<PartitionMsg>, mpsc::UnboundedReceiver<Seen>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Recorder, sender).await.expect("recorder");
        (actor, receiver)
    }

    async fn drain(receiver: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<Seen> {
        // Let the recorder take what was sent.
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut seen = Vec::new();
        while let Ok(message) = receiver.try_recv() {
            seen.push(message);
        }
        seen
    }

    fn event(sensor: &str, position: Position) -> Event {
        Event {
            sensor_id: sensor.into(),
            event_type: "t".into(),
            value: 1.0,
            timestamp_ms: 1_000,
            ingest_ms: 0,
            position,
        }
    }

    fn router(partitions: u32, max_buffered: usize, mode: LogMode) -> PartitionRouter {
        PartitionRouter::new(partitions, max_buffered, mode, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn without_an_actor_nothing_is_delivered_and_nothing_advances() {
        let router = router(1, 1024, LogMode::External);
        assert!(!router.deliver(0, vec![event("a", 10), event("a", 11)]), "no actor to take them");
        assert_eq!(router.status(0).next_position, 0, "the position did not move past undelivered events");
        assert!(!router.deliver_no_event(0, NoEvent { from: 12, to: 13, kind: NoEventKind::Skipped, letter: None }));
        assert_eq!(router.unconfirmed(0), 0);

        let (actor, mut seen) = recorder().await;
        router.rewind(0, 10);
        router.attach(0, actor, 10);
        assert!(router.deliver(0, vec![event("a", 10), event("a", 11)]));
        assert!(router.deliver_no_event(0, NoEvent { from: 12, to: 14, kind: NoEventKind::Skipped, letter: None }));
        assert_eq!(drain(&mut seen).await, vec![Seen::Events(vec![10, 11]), Seen::NoEvent(12, 14)]);
        assert_eq!(router.status(0).next_position, 14);
        assert_eq!(router.unconfirmed(0), 4, "counted from the checkpoint it was rewound to");
    }

    #[tokio::test]
    async fn the_bound_asks_for_a_checkpoint_at_a_quarter_and_again_after_one_completes() {
        let router = router(1, 64, LogMode::External);
        assert_eq!(router.limit(), 64);
        let (actor, mut seen) = recorder().await;
        router.attach(0, actor, 0);
        let batch = |from: Position, n: u64| (from..from + n).map(|p| event("a", p)).collect::<Vec<_>>();
        assert!(router.deliver(0, batch(0, 15)));
        assert!(!drain(&mut seen).await.contains(&Seen::Checkpoint), "15 of 64: no checkpoint yet");
        assert!(router.deliver(0, batch(15, 2)));
        assert!(drain(&mut seen).await.contains(&Seen::Checkpoint), "a quarter of the bound: checkpoint");
        assert!(router.deliver(0, batch(17, 20)));
        assert!(!drain(&mut seen).await.contains(&Seen::Checkpoint), "asked once until one completes");
        // The checkpoint covers 17 of 37: 20 still unconfirmed, past the quarter: ask again.
        router.checkpoint_complete(0, 17, 1);
        assert_eq!(router.unconfirmed(0), 20);
        assert!(drain(&mut seen).await.contains(&Seen::Checkpoint));
        router.checkpoint_complete(0, 37, 2);
        assert_eq!(router.unconfirmed(0), 0);
        assert!(!drain(&mut seen).await.contains(&Seen::Checkpoint));
    }

    #[tokio::test]
    async fn embedded_requests_are_taken_whole_or_refused_whole() {
        let router = router(2, 64, LogMode::Replay);
        let (a, _seen_a) = recorder().await;
        let (b, _seen_b) = recorder().await;
        router.attach(0, a, 0);
        router.attach(1, b, 0);
        let sensors: Vec<String> = (0..200).map(|i| format!("s-{i}")).collect();
        let events: Vec<Event> = sensors.iter().take(30).map(|s| event(s, 0)).collect();
        assert_eq!(router.submit(events), Ok(30));
        let before: Vec<_> = (0..2).map(|p| router.status(p).next_position).collect();
        let more: Vec<Event> = sensors.iter().skip(30).take(50).map(|s| event(s, 0)).collect();
        assert!(matches!(router.submit(more), Err(SubmitError::Backpressure { .. })));
        // Larger than a partition's share: no retry could ever succeed.
        let huge: Vec<Event> = sensors.iter().map(|s| event(s, 0)).collect();
        assert!(matches!(router.submit(huge), Err(SubmitError::TooLarge { limit: 32, .. })));
        let after: Vec<_> = (0..2).map(|p| router.status(p).next_position).collect();
        assert_eq!(before, after, "nothing of a refused request was taken");
        router.close();
        assert_eq!(router.submit(vec![event("x", 0)]), Err(SubmitError::Closed));
    }

    #[tokio::test]
    async fn the_embedded_ingest_clock_never_goes_back_in_log_order() {
        let router = router(1, 1024, LogMode::Replay);
        let (actor, mut seen) = recorder().await;
        router.attach(0, actor, 0);
        let future = chrono::Utc::now().timestamp_millis() + 60_000;
        router.tick(future);
        // An event accepted after the tick is stamped no earlier than the tick: an idle
        // decision never sees a time newer than an event already in the log.
        router.submit(vec![event("a", 0)]).expect("accepted");
        let seen = drain(&mut seen).await;
        assert_eq!(seen.first(), Some(&Seen::Tick(future)));
        let (stamped, _) = {
            let guard = router.slot(0).state.lock();
            let stamped = guard.log.iter().find_map(|entry| match entry {
                LogEntry::Events(batch) => batch.first().map(|e| e.ingest_ms),
                LogEntry::Tick { .. } => None,
            });
            (stamped, guard.clock_ms)
        };
        assert_eq!(stamped, Some(future));
    }

    #[tokio::test]
    async fn a_quarantined_position_is_released_by_the_checkpoint_that_covers_it() {
        let router = router(1, 1024, LogMode::Replay);
        let progress = router.progress(0);
        assert_eq!(progress.quarantined(5), None);
        router.quarantine(0, 5, "boom".into());
        assert_eq!(progress.quarantined(5).as_deref(), Some("boom"));
        assert_eq!(progress.quarantined(6), None);
        let (actor, _seen) = recorder().await;
        router.attach(0, actor, 0);
        router.checkpoint_complete(0, 5, 1);
        assert!(progress.quarantined(5).is_some(), "not covered yet");
        router.checkpoint_complete(0, 6, 2);
        assert_eq!(progress.quarantined(5), None);
    }

    #[tokio::test]
    async fn a_partition_index_out_of_range_never_panics() {
        let router = router(2, 1024, LogMode::External);
        assert!(!router.contains(2));
        // A bad index is a bug upstream, but it must not take the poll thread down.
        let _ = router.status(7);
        assert!(!router.deliver(9, vec![event("a", 0)]));
    }
}
