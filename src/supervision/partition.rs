//! The partition supervisor: starts one [`PartitionActor`] per partition from its last
//! complete checkpoint, and restarts a failed one the same way, replaying the events
//! logged after that checkpoint. It owns the routing table (in the router), quarantines
//! poison events, and escalates when a partition exhausts its restart budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use super::policy::{Decision, ExitStatus, RestartBudget, RestartPolicy, RestartTracker, RetryBackoff};
use crate::actors::partition::{PartitionActor, PartitionArgs, PartitionContext};
use crate::messages::{DeadLetter, PartitionId, Position, RejectReason, RestoredPartition, StoreMsg};
use crate::metrics::{ActorLabels, PartitionLabels};
use crate::router::PartitionRouter;
use crate::store::Store;

pub struct PartitionSupervisor;

pub struct PartitionSupervisorArgs {
    pub context: Arc<PartitionContext>,
    pub router: Arc<PartitionRouter>,
    /// Where checkpoints are restored from; `None` (a file replay) starts empty.
    pub store: Option<Arc<dyn Store>>,
    pub budget: RestartBudget,
    pub max_event_attempts: u32,
}

pub enum PartitionSupervisorMsg {
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
            load_backoff: (0..partitions)
                .map(|_| RetryBackoff::new(Duration::from_millis(100), Duration::from_secs(5)))
                .collect(),
            shutting_down: false,
        };
        for partition in 0..partitions as PartitionId {
            state.args.router.clear_actor(partition);
            // At start-up a store that cannot be read is an error the operator must see.
            let restored = state.load(partition).await?;
            if let Some(restored) = &restored {
                state.args.router.start_at(partition, restored.next_position);
            }
            state.spawn(&myself, partition, restored).await?;
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
            PartitionSupervisorMsg::Restart(partition) => {
                if state.shutting_down || state.args.router.actor(partition).is_some() {
                    return Ok(());
                }
                match state.load(partition).await {
                    Ok(restored) => {
                        state.load_backoff[partition as usize].reset();
                        state.spawn(&myself, partition, restored).await?;
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
        let failed_at = state.args.router.detach(partition);
        if state.shutting_down {
            return Ok(());
        }
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
        let replayed = self.args.router.attach(partition, actor, from);
        if replayed > 0 {
            tracing::info!(partition, from, replayed, "partition restored from checkpoint and replaying");
        }
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
