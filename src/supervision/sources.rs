//! The source supervisor: runs the Kafka source and restarts it when it fails (the
//! consumer rejoins its group; every partition it is given restarts from its
//! checkpoint).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::policy::{ExitStatus, RestartBudget, RestartTracker};
use crate::actors::sources::kafka::{KafkaShared, KafkaSource, KafkaSourceMsg};
use crate::metrics::Metrics;

pub struct SourceSupervisor;

pub struct SourceSupervisorArgs {
    pub kafka: Arc<KafkaShared>,
    pub metrics: Arc<Metrics>,
    pub budget: RestartBudget,
}

pub enum SourceSupervisorMsg {
    Restart,
    ShuttingDown,
    /// Stop the source and wait until it left its group (graceful shutdown: the
    /// revocation checkpoints every partition and commits its offset).
    StopSources(RpcReplyPort<()>),
}

pub struct SourceSupervisorState {
    args: SourceSupervisorArgs,
    source: Option<ActorRef<KafkaSourceMsg>>,
    tracker: RestartTracker,
    shutting_down: bool,
}

impl SourceSupervisorState {
    async fn spawn(&mut self, myself: &ActorRef<SourceSupervisorMsg>) -> Result<(), ActorProcessingErr> {
        let (source, _) =
            Actor::spawn_linked(None, KafkaSource, Arc::clone(&self.args.kafka), myself.get_cell()).await?;
        self.source = Some(source);
        Ok(())
    }
}

impl Actor for SourceSupervisor {
    type Msg = SourceSupervisorMsg;
    type State = SourceSupervisorState;
    type Arguments = SourceSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SourceSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state =
            SourceSupervisorState { args, source: None, tracker: RestartTracker::default(), shutting_down: false };
        state.spawn(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SourceSupervisorMsg::Restart => {
                if !state.shutting_down && state.source.is_none() {
                    state.spawn(&myself).await?;
                }
            }
            SourceSupervisorMsg::ShuttingDown => state.shutting_down = true,
            SourceSupervisorMsg::StopSources(reply) => {
                state.shutting_down = true;
                if let Some(source) = state.source.take() {
                    let _ = source.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(60))).await;
                }
                let _ = reply.send(());
            }
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
        state.source = None;
        if state.shutting_down {
            return Ok(());
        }
        tracing::error!(source = "kafka", reason = status.message(), "source exited");
        super::policy::on_child_exit(
            &myself,
            "source-kafka",
            &status,
            &mut state.tracker,
            &state.args.budget,
            &state.args.metrics,
            || SourceSupervisorMsg::Restart,
        )
    }
}
