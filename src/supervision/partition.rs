//! The partition supervisor: starts one [`PartitionActor`] per partition from its last
//! complete checkpoint, and restarts a failed one the same way, replaying the events
//! logged after that checkpoint. It owns the routing table (in the router), quarantines
//! poison events, and escalates when a partition exhausts its restart budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::policy::{ExitStatus, RestartBudget, RestartTracker, RetryBackoff};
use crate::actors::partition::{PartitionActor, PartitionArgs, PartitionContext};
use crate::messages::{PartitionId, PartitionMsg, Position, RestoredPartition};
use crate::metrics::PartitionLabels;
use crate::router::PartitionRouter;
use crate::store::Store;

pub struct PartitionSupervisor;

/// How a partition's (re)started actor gets its events from its checkpoint on.
pub trait PartitionFeed: Send + Sync {
    /// Make `actor` the partition's actor, fed from position `from`. `restart` is true
    /// when the actor replaces one that failed (its events must be read again).
    fn attach(&self, partition: PartitionId, actor: ActorRef<PartitionMsg>, from: Position, restart: bool);

    /// A new partition supervisor started with no actors (the tree was restarted): a
    /// source that assigns partitions itself must start its partitions again.
    fn supervisor_started(&self) {}
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
    /// Where checkpoints are restored from and partitions are owned; `None` (a file
    /// replay) starts empty and unfenced.
    pub store: Option<Arc<dyn Store>>,
    /// This instance's name in the store's ownership table.
    pub owner: String,
    pub budget: RestartBudget,
    pub max_event_attempts: u32,
    pub feed: Arc<dyn PartitionFeed>,
    pub assignment: Assignment,
}

pub enum PartitionSupervisorMsg {
    /// Take ownership of `partition` and run it from its checkpoint (a Kafka partition
    /// was assigned). Replies with the checkpoint's position (`None`: no checkpoint).
    Start { partition: PartitionId, reply: RpcReplyPort<Result<Option<Position>, String>> },
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
    /// The checkpoint position each partition was last (re)started from.
    started_from: Vec<Option<Position>>,
    /// Restarts in a row from the same checkpoint (no progress in between).
    stuck: Vec<u32>,
    shutting_down: bool,
}

/// Checkpoint spacing for an actor restarted after `stuck` restarts in a row without
/// progress: 256, 64, 16, 4, then every event, never above `configured` (when set).
fn boosted_checkpoint_spacing(stuck: u32, configured: u64) -> u64 {
    let spacing = 256u64 >> (2 * stuck.min(4));
    if configured > 0 { spacing.min(configured).max(1) } else { spacing.max(1) }
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
            started_from: vec![None; partitions],
            stuck: vec![0; partitions],
            shutting_down: false,
        };
        for partition in 0..partitions as PartitionId {
            state.args.router.clear_actor(partition);
        }
        match state.args.assignment {
            Assignment::All => {
                for partition in 0..partitions as PartitionId {
                    // At start-up a store that cannot be read is an error the operator must see.
                    let (epoch, restored) = state.acquire_and_load(partition).await?;
                    if let Some(restored) = &restored {
                        state.args.router.start_at(partition, restored.next_position, restored.clock_ms);
                    }
                    state.spawn(&myself, partition, epoch, restored, false, None).await?;
                }
            }
            Assignment::Dynamic => state.args.feed.supervisor_started(),
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
            PartitionSupervisorMsg::Start { partition, reply } => {
                let outcome = if partition as usize >= state.trackers.len() {
                    Err(format!(
                        "partition {partition} is outside pipeline.partitions = {}: set pipeline.partitions to the \
                         topic's partition count",
                        state.trackers.len()
                    ))
                } else {
                    // Still running from an earlier assignment: replace it.
                    state.stop_partition(partition).await;
                    state.released.remove(&partition);
                    match state.acquire_and_load(partition).await {
                        Ok((epoch, restored)) => {
                            let from = restored.as_ref().map(|r| r.next_position);
                            state
                                .spawn(&myself, partition, epoch, restored, false, None)
                                .await
                                .map(|()| from)
                                .map_err(|error| error.to_string())
                        }
                        Err(error) => Err(format!("cannot take partition {partition}: {error}")),
                    }
                };
                let _ = reply.send(outcome);
            }
            PartitionSupervisorMsg::Stop { partition, reply } => {
                // Marked released even without an actor, so a restart still pending (its
                // actor failed just before the revocation) does not start it again.
                state.released.insert(partition);
                state.stop_partition(partition).await;
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
                    Ok(()) => state.acquire_and_load(partition).await,
                    Err(error) => Err(error),
                };
                match restored {
                    Ok((epoch, restored)) => {
                        let index = partition as usize;
                        state.load_backoff[index].reset();
                        // Progress since the last start: the failures before it are
                        // forgiven (budget and backoff). None: every restart from here
                        // checkpoints more often, until one moves the checkpoint on.
                        let from = restored.as_ref().map(|r| r.next_position);
                        if from > state.started_from[index] {
                            state.trackers[index].forgive();
                            state.stuck[index] = 0;
                        } else {
                            state.stuck[index] = state.stuck[index].saturating_add(1);
                        }
                        let spacing =
                            boosted_checkpoint_spacing(state.stuck[index], state.args.context.checkpoint_max_events);
                        let boost = Some((spacing, tokio::time::Instant::now() + state.args.budget.window));
                        state.spawn(&myself, partition, epoch, restored, true, boost).await?;
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
        super::policy::on_child_exit(
            &myself,
            &format!("partition-{partition}"),
            &status,
            &mut state.trackers[index],
            &state.args.budget,
            &state.args.context.metrics,
            move || PartitionSupervisorMsg::Restart(partition),
        )
    }
}

impl PartitionSupervisorState {
    /// Wait until the sinks wrote everything sent to them so far.
    async fn drain_sinks(&self) -> Result<(), ActorProcessingErr> {
        Ok(self.args.context.sinks.drain(Duration::from_secs(10)).await?)
    }

    /// Take the next ownership epoch of `partition`, then load its checkpoint: in this
    /// order, a checkpoint of an earlier owner is either in what we load or fenced.
    async fn acquire_and_load(
        &self,
        partition: PartitionId,
    ) -> Result<(u64, Option<RestoredPartition>), ActorProcessingErr> {
        let partitions = self.args.router.partitions();
        match &self.args.store {
            Some(store) => {
                let epoch = store.acquire_partition(partition, &self.args.owner).await?;
                let restored = store.load_checkpoint(partition, partitions).await?;
                Ok((epoch, restored))
            }
            None => Ok((0, None)),
        }
    }

    /// Stop `partition`'s actor (if any) without it counting as a failure.
    async fn stop_partition(&mut self, partition: PartitionId) {
        if let Some(actor) = self.args.router.actor(partition) {
            // Forget the child first: its exit is not a failure to restart from.
            self.children.remove(&actor.get_id());
            let _ = actor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
        self.args.router.clear_actor(partition);
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<PartitionSupervisorMsg>,
        partition: PartitionId,
        owner_epoch: u64,
        restored: Option<RestoredPartition>,
        restart: bool,
        checkpoint_boost: Option<(u64, tokio::time::Instant)>,
    ) -> Result<(), ActorProcessingErr> {
        let from = restored.as_ref().map_or(0, |r| r.next_position);
        self.started_from[partition as usize] = restored.as_ref().map(|r| r.next_position);
        let args = PartitionArgs {
            partition,
            context: Arc::clone(&self.args.context),
            progress: self.args.router.progress(partition),
            restored,
            owner_epoch,
            checkpoint_boost,
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
        tracing::error!(partition, position, "quarantining poison event");
        self.args.context.metrics.events_quarantined.get_or_create(&PartitionLabels { partition }).inc();
        // The restarted actor meets the event again (replay log or Kafka) and
        // dead-letters it, in order, with the checkpoint that covers it.
        self.args.router.quarantine(
            partition,
            position,
            format!(
                "event crashed partition {partition} {} times; last failure: {message}",
                self.args.max_event_attempts
            ),
        );
    }
}
