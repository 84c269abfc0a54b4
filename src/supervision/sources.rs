//! The source supervisor: runs the sources other than HTTP — the Kafka consumer and the
//! MQTT client — and restarts one that fails (the consumer rejoins its group and every
//! partition it is given restarts from its checkpoint; the MQTT client resumes its
//! session and the broker redelivers what was not acknowledged).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::policy::{ExitStatus, RestartBudget, RestartTracker};
use crate::actors::sources::kafka::{KafkaShared, KafkaSource};
use crate::actors::sources::mqtt::{MqttSource, MqttSourceArgs};
use crate::metrics::Metrics;

pub struct SourceSupervisor;

pub struct SourceSupervisorArgs {
    pub kafka: Option<Arc<KafkaShared>>,
    pub mqtt: Option<MqttSourceArgs>,
    pub metrics: Arc<Metrics>,
    pub budget: RestartBudget,
}

/// The source actors this supervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Kafka,
    Mqtt,
}

impl SourceKind {
    /// In the order they stop: MQTT first (it feeds the pipeline, or the topic the Kafka
    /// source reads), then Kafka.
    const ALL: [SourceKind; 2] = [SourceKind::Mqtt, SourceKind::Kafka];

    fn name(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Mqtt => "mqtt",
        }
    }
}

pub enum SourceSupervisorMsg {
    Restart(SourceKind),
    ShuttingDown,
    /// Stop the sources and wait until they are gone (graceful shutdown: the MQTT client
    /// acknowledges what it handed over and disconnects; the Kafka consumer's revocation
    /// checkpoints every partition and commits its offset).
    StopSources(RpcReplyPort<()>),
}

struct Child {
    kind: SourceKind,
    actor: Option<ActorCell>,
    tracker: RestartTracker,
}

pub struct SourceSupervisorState {
    args: SourceSupervisorArgs,
    children: Vec<Child>,
    shutting_down: bool,
}

impl SourceSupervisorState {
    async fn spawn(
        &mut self,
        kind: SourceKind,
        myself: &ActorRef<SourceSupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let cell = match kind {
            SourceKind::Kafka => match &self.args.kafka {
                Some(kafka) => Some(
                    Actor::spawn_linked(None, KafkaSource, Arc::clone(kafka), myself.get_cell()).await?.0.get_cell(),
                ),
                None => None,
            },
            SourceKind::Mqtt => match &self.args.mqtt {
                Some(mqtt) => {
                    Some(Actor::spawn_linked(None, MqttSource, mqtt.clone(), myself.get_cell()).await?.0.get_cell())
                }
                None => None,
            },
        };
        if let Some(cell) = cell {
            match self.children.iter_mut().find(|child| child.kind == kind) {
                Some(child) => child.actor = Some(cell),
                None => self.children.push(Child { kind, actor: Some(cell), tracker: RestartTracker::default() }),
            }
        }
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
        let mut state = SourceSupervisorState { args, children: Vec::new(), shutting_down: false };
        for kind in [SourceKind::Kafka, SourceKind::Mqtt] {
            state.spawn(kind, &myself).await?;
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
            SourceSupervisorMsg::Restart(kind) => {
                let running = state.children.iter().any(|child| child.kind == kind && child.actor.is_some());
                if !state.shutting_down && !running {
                    state.spawn(kind, &myself).await?;
                }
            }
            SourceSupervisorMsg::ShuttingDown => state.shutting_down = true,
            SourceSupervisorMsg::StopSources(reply) => {
                state.shutting_down = true;
                for kind in SourceKind::ALL {
                    let Some(child) = state.children.iter_mut().find(|child| child.kind == kind) else {
                        continue;
                    };
                    if let Some(actor) = child.actor.take() {
                        let _ = actor.stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(60))).await;
                    }
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
        let exited: Option<ActorId> = event.actor_cell().map(|cell| cell.get_id());
        let Some(child) =
            state.children.iter_mut().find(|child| child.actor.as_ref().map(|cell| cell.get_id()) == exited)
        else {
            return Ok(());
        };
        child.actor = None;
        if state.shutting_down {
            return Ok(());
        }
        let kind = child.kind;
        let name = kind.name();
        tracing::error!(source = name, reason = status.message(), "source exited");
        super::policy::on_child_exit(
            &myself,
            &format!("source-{name}"),
            &status,
            &mut child.tracker,
            &state.args.budget,
            &state.args.metrics,
            move || SourceSupervisorMsg::Restart(kind),
        )
    }
}
