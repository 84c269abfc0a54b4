//! The partition supervisor: starts one [`PartitionActor`] per partition from its last
//! complete checkpoint, and restarts a failed one the same way, replaying the events
//! logged after that checkpoint. It owns the routing table (in the router), quarantines
//! poison events, and escalates when a partition exhausts its restart budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;

use super::policy::{Decision, ExitStatus, RestartBudget, RestartPolicy, RestartTracker, RetryBackoff};
use crate::actors::partition::{PartitionActor, PartitionArgs, PartitionContext};
use crate::messages::{DeadLetter, PartitionId, PartitionMsg, Position, RejectReason, RestoredPartition, StoreMsg};
use crate::metrics::{ActorLabels, PartitionLabels};
use crate::router::PartitionRouter;
use crate::store::Store;

pub struct PartitionSupervisor;

/// How a partition's (re)started actor gets its events from its checkpoint on.
pub trait PartitionFeed: Send + Sync {
    /// Make `actor` the partition's actor, fed from position `from`. `restart` is true
    /// when the actor replaces one that failed (its events must be read again).
    fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position, restart: bool);
}

/// Embedded mode: the router replays its in-memory log.
impl PartitionFeed for PartitionRouter {
    fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position, _restart: bool) {
        let replayed = PartitionRouter::attach(self, partition, actor, from);
        if replayed > 0 {
            tracing::info!(partition, from, replayed, "partition restored from checkpoint and replaying");
        }
    }
}

/// Which partitions the supervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// Every partition, from start-up (embedded ingestion, file replay).
    All,
    /// Those a source asks for with `Start` and releases with `Stop` (Kafka partitions
    /// assigned to this instance by the consumer group).
    Dynamic,
}

pub struct PartitionSupervisorArgs {
    pub context: Arc<PartitionContext>,
    pub router: Arc<PartitionRouter>,
    /// Where checkpoints are restored from; `None` (a file replay) starts empty.
    pub store: Option<Arc<dyn Store>>,
    pub budget: RestartBudget,
    pub max_event_attempts: u32,
    pub feed: Arc<dyn PartitionFeed>,
    pub assignment: Assignment,
}

pub enum PartitionSupervisorMsg {
    /// Run `partition` from this checkpoint (a Kafka partition was assigned).
    Start { partition: PartitionId, restored: Option<RestoredPartition>, reply: RpcReplyPort<Result<(), String>> },
    /// Stop `partition`'s actor and do not restart it (its Kafka partition was revoked).
    /// The caller checkpoints it first.
    Stop { partition: PartitionId, reply: RpcReplyPort<()> },
    /// Start (again) the actor of a partition from its checkpoint.
    Restart(PartitionId),
    /// Rewind every partition to its last complete checkpoint: a sink lost data it had
    /// not written, so everything after the checkpoints must be emitted again.
    RewindAll,
    /// Stop restarting children (graceful shutdown).
    ShuttingDown,
}

pub struct PartitionSupervisorState {
    args: PartitionSupervisorArgs,
    children: HashMap<ActorId, PartitionId>,
    trackers: Vec<RestartTracker>,
    /// Crashes attributed to each event position, per partition (poison detection).
    attempts: Vec<HashMap<Position, u32>>,
    /// Partitions being rewound on purpose: their exit does not count as a failure.
    rewinding: Vec<bool>,
    /// Partitions stopped on purpose: not restarted.
    released: HashSet<PartitionId>,
    load_backoff: Vec<RetryBackoff>,
    shutting_down: bool,
}

impl Actor for PartitionSupervisor {
    type Msg = PartitionSupervisorMsg;
    type State = PartitionSupervisorState;
    type Arguments = PartitionSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let partitions = args.router.partitions() as usize;
        let mut state = PartitionSupervisorState {
            args,
            children: HashMap::new(),
            trackers: vec![RestartTracker::default(); partitions],
            attempts: vec![HashMap::new(); partitions],
            rewinding: vec![false; partitions],
            released: HashSet::new(),
            load_backoff: (0..partitions)
                .map(|_| RetryBackoff::new(Duration::from_millis(100), Duration::from_secs(5)))
                .collect(),
            shutting_down: false,
        };
        for partition in 0..partitions as PartitionId {
            state.args.router.clear_actor(partition);
        }
        if state.args.assignment == Assignment::All {
            for partition in 0..partitions as PartitionId {
                // At start-up a store that cannot be read is an error the operator must see.
                let restored = state.load(partition).await?;
                if let Some(restored) = &restored {
                    state.args.router.start_at(partition, restored.next_position);
                }
                state.spawn(&myself, partition, restored, false).await?;
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PartitionSupervisorMsg::Start { partition, restored, reply } => {
                let outcome = if partition as usize >= state.trackers.len() {
                    Err(format!("partition {partition} is outside pipeline.partitions = {}", state.trackers.len()))
                } else {
                    state.released.remove(&partition);
                    if let Some(old) = state.args.router.actor(partition) {
                        // Still running from an earlier assignment: replace it.
                        state.released.insert(partition);
                        let _ = old.stop_and_wait(None, Some(Duration::from_secs(10))).await;
                        state.released.remove(&partition);
                    }
                    state.spawn(&myself, partition, restored, false).await.map_err(|error| error.to_string())
                };
                let _ = reply.send(outcome);
            }
            PartitionSupervisorMsg::Stop { partition, reply } => {
                state.released.insert(partition);
                if let Some(actor) = state.args.router.actor(partition) {
                    let _ = actor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
                }
                state.args.router.clear_actor(partition);
                let _ = reply.send(());
            }
            PartitionSupervisorMsg::Restart(partition) => {
                if state.shutting_down
                    || state.released.contains(&partition)
                    || state.args.router.actor(partition).is_some()
                {
                    return Ok(());
                }
                // The failed actor may have sent a checkpoint that is still queued in the
                // sinks: let it land first, or it would commit after the restore and no
                // longer match the state the new actor rebuilds.
                let restored = match state.drain_sinks().await {
                    Ok(()) => state.load(partition).await,
                    Err(error) => Err(error),
                };
                match restored {
                    Ok(restored) => {
                        state.load_backoff[partition as usize].reset();
                        state.spawn(&myself, partition, restored, true).await?;
                    }
                    Err(error) => {
                        let delay = state.load_backoff[partition as usize].next_delay();
                        tracing::warn!(partition, error = %error, retry_in_ms = delay.as_millis() as u64,
                            "cannot load checkpoint to restart partition, retrying");
                        myself.send_after(delay, move || PartitionSupervisorMsg::Restart(partition));
                    }
                }
            }
            PartitionSupervisorMsg::RewindAll => {
                tracing::warn!("rewinding every partition to its last complete checkpoint");
                for partition in 0..state.args.router.partitions() {
                    if let Some(actor) = state.args.router.actor(partition) {
                        state.rewinding[partition as usize] = true;
                        actor.kill();
                    }
                }
            }
            PartitionSupervisorMsg::ShuttingDown => state.shutting_down = true,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(status) = ExitStatus::of(&event) else {
            return Ok(());
        };
        let Some(cell) = event.actor_cell() else {
            return Ok(());
        };
        let Some(partition) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.shutting_down || state.released.contains(&partition) {
            return Ok(());
        }
        let failed_at = state.args.router.detach(partition);
        let index = partition as usize;
        if std::mem::take(&mut state.rewinding[index]) {
            myself.send_message(PartitionSupervisorMsg::Restart(partition))?;
            return Ok(());
        }
        tracing::error!(partition, position = ?failed_at, reason = status.message(), "partition actor exited");
        if let (ExitStatus::Failed(message), Some(position)) = (&status, failed_at) {
            state.count_attempt(partition, position, message);
        }
        let decision =
            state.trackers[index].decide(Instant::now(), &status, RestartPolicy::Permanent, &state.args.budget);
        match decision {
            Decision::Restart { after, attempt } => {
                state
                    .args
                    .context
                    .metrics
                    .actor_restarts
                    .get_or_create(&ActorLabels { actor: format!("partition-{partition}") })
                    .inc();
                tracing::warn!(partition, attempt, delay_ms = after.as_millis() as u64, "restarting partition");
                myself.send_after(after, move || PartitionSupervisorMsg::Restart(partition));
                Ok(())
            }
            Decision::Ignore => Ok(()),
            Decision::Escalate { restarts, window } => Err(format!(
                "partition {partition} failed {restarts} times within {}; escalating (last: {})",
                humantime::format_duration(window),
                status.message()
            )
            .into()),
        }
    }
}

impl PartitionSupervisorState {
    /// Wait until the sinks wrote everything sent to them so far (the Kafka sink first:
    /// it forwards checkpoints to the store sink).
    async fn drain_sinks(&self) -> Result<(), ActorProcessingErr> {
        let sinks = &self.args.context.sinks;
        let timeout = Some(Duration::from_secs(10));
        if sinks.kafka_configured() {
            let kafka = sinks.kafka().ok_or("the kafka sink is restarting")?;
            let reply = kafka.call(crate::actors::sinks::kafka::KafkaSinkMsg::Flush, timeout).await?;
            if !reply.is_success() {
                return Err("the kafka sink did not drain in time".into());
            }
        }
        let store = sinks.store().ok_or("the store sink is restarting")?;
        let reply = store.call(StoreMsg::Flush, timeout).await?;
        if !reply.is_success() {
            return Err("the store sink did not drain in time".into());
        }
        Ok(())
    }

    async fn load(&self, partition: PartitionId) -> Result<Option<RestoredPartition>, ActorProcessingErr> {
        let partitions = self.args.router.partitions();
        match &self.args.store {
            Some(store) => Ok(store.load_checkpoint(partition, partitions).await?),
            None => Ok(None),
        }
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<PartitionSupervisorMsg>,
        partition: PartitionId,
        restored: Option<RestoredPartition>,
        restart: bool,
    ) -> Result<(), ActorProcessingErr> {
        let from = restored.as_ref().map_or(0, |r| r.next_position);
        let args = PartitionArgs {
            partition,
            context: Arc::clone(&self.args.context),
            progress: self.args.router.progress(partition),
            restored,
        };
        let (actor, _) = Actor::spawn_linked(None, PartitionActor, args, myself.get_cell()).await?;
        self.children.insert(actor.get_id(), partition);
        self.args.feed.attach(partition, actor, from, restart);
        Ok(())
    }

    /// One more crash while processing `position`; quarantine the event once it has
    /// failed `max_event_attempts` times.
    fn count_attempt(&mut self, partition: PartitionId, position: Position, message: &str) {
        let index = partition as usize;
        let checkpointed = self.args.router.status(partition).last_checkpoint_position;
        let attempts = &mut self.attempts[index];
        attempts.retain(|&p, _| p >= checkpointed);
        let count = attempts.entry(position).or_insert(0);
        *count += 1;
        if *count < self.args.max_event_attempts {
            return;
        }
        attempts.remove(&position);
        let Some(event) = self.args.router.quarantine(partition, position) else {
            return;
        };
        tracing::error!(partition, position, sensor_id = %event.sensor_id, "quarantining poison event");
        self.args.context.metrics.events_quarantined.get_or_create(&PartitionLabels { partition }).inc();
        let letter = DeadLetter::for_event(
            &event,
            RejectReason::Poison,
            format!(
                "event crashed partition {partition} {} times; last failure: {message}",
                self.args.max_event_attempts
            ),
            partition,
        );
        if self.args.context.sinks.send_store(StoreMsg::DeadLetters(vec![letter])).is_err() {
            tracing::error!(partition, position, "store sink unavailable: poison event kept only in the log");
        }
    }
}
