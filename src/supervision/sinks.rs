//! The sink supervisor: runs the sink actors and restarts a failed one. A sink that dies
//! loses the batch it held, so after restarting it the partitions are rewound to their
//! last complete checkpoints and emit everything after them again (idempotently).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use super::Topology;
use super::policy::{Decision, ExitStatus, RestartBudget, RestartPolicy, RestartTracker};
use crate::actors::sinks::store::{StoreSink, StoreSinkArgs};
use crate::actors::sinks::{CheckpointListener, Sinks};
use crate::config::{ChaosConfig, StoreConfig};
use crate::metrics::{ActorLabels, Metrics};
use crate::store::Store;

pub struct SinkSupervisor;

pub struct SinkSupervisorArgs {
    pub store: Arc<dyn Store>,
    pub store_config: StoreConfig,
    pub listener: Arc<dyn CheckpointListener>,
    pub metrics: Arc<Metrics>,
    pub sinks: Arc<Sinks>,
    pub chaos: ChaosConfig,
    pub budget: RestartBudget,
    pub topology: Arc<Topology>,
}

pub enum SinkSupervisorMsg {
    RestartStore,
    ShuttingDown,
}

pub struct SinkSupervisorState {
    args: SinkSupervisorArgs,
    store_tracker: RestartTracker,
    shutting_down: bool,
}

impl SinkSupervisorState {
    async fn spawn_store(&self, myself: &ActorRef<SinkSupervisorMsg>) -> Result<(), ActorProcessingErr> {
        let args = StoreSinkArgs {
            store: Arc::clone(&self.args.store),
            config: self.args.store_config.clone(),
            listener: Arc::clone(&self.args.listener),
            metrics: Arc::clone(&self.args.metrics),
            health: Arc::clone(&self.args.sinks.store_health),
            chaos: self.args.chaos.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, StoreSink, args, myself.get_cell()).await?;
        self.args.sinks.set_store(Some(actor));
        Ok(())
    }
}

impl Actor for SinkSupervisor {
    type Msg = SinkSupervisorMsg;
    type State = SinkSupervisorState;
    type Arguments = SinkSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SinkSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = SinkSupervisorState { args, store_tracker: RestartTracker::default(), shutting_down: false };
        state.spawn_store(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SinkSupervisorMsg::RestartStore => {
                if !state.shutting_down {
                    state.spawn_store(&myself).await?;
                    // What the old sink held is gone: replay it from the checkpoints.
                    state.args.topology.rewind_partitions();
                }
            }
            SinkSupervisorMsg::ShuttingDown => state.shutting_down = true,
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
        state.args.sinks.set_store(None);
        if state.shutting_down {
            return Ok(());
        }
        tracing::error!(sink = "store", reason = status.message(), "sink actor exited");
        match state.store_tracker.decide(Instant::now(), &status, RestartPolicy::Permanent, &state.args.budget) {
            Decision::Restart { after, .. } => {
                state.args.metrics.actor_restarts.get_or_create(&ActorLabels { actor: "sink-store".into() }).inc();
                myself.send_after(after, || SinkSupervisorMsg::RestartStore);
                Ok(())
            }
            Decision::Ignore => Ok(()),
            Decision::Escalate { restarts, window } => Err(format!(
                "store sink failed {restarts} times within {}; escalating (last: {})",
                humantime::format_duration(window),
                status.message()
            )
            .into()),
        }
    }
}
