//! The sink supervisor: runs the sink actors and restarts a failed one. A sink that dies
//! loses the batch it held, so after restarting it the partitions are rewound to their
//! last complete checkpoints and emit everything after them again (idempotently).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::Topology;
use super::policy::{ExitStatus, RestartBudget, RestartTracker};
use crate::actors::sinks::kafka::{KafkaSink, KafkaSinkArgs};
use crate::actors::sinks::store::{StoreSink, StoreSinkArgs};
use crate::actors::sinks::{CheckpointListener, Sinks};
use crate::config::{ChaosConfig, StoreConfig};
use crate::metrics::Metrics;
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
    /// Output topics (when configured).
    pub kafka: Option<KafkaOutputs>,
}

#[derive(Clone)]
pub struct KafkaOutputs {
    pub producer: rdkafka::producer::FutureProducer,
    pub results_topic: Option<String>,
    pub alerts_topic: Option<String>,
    pub timeout: std::time::Duration,
}

pub enum SinkSupervisorMsg {
    RestartStore,
    RestartKafka,
    ShuttingDown,
}

pub struct SinkSupervisorState {
    args: SinkSupervisorArgs,
    store_tracker: RestartTracker,
    kafka_tracker: RestartTracker,
    kafka_sink: Option<ractor::ActorId>,
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
        // What a failed sink held is gone; what the new one receives is counted afresh.
        self.args.sinks.store_health.pending_dead_letters.store(0, std::sync::atomic::Ordering::Relaxed);
        let (actor, _) = Actor::spawn_linked(None, StoreSink, args, myself.get_cell()).await?;
        self.args.sinks.set_store(Some(actor));
        Ok(())
    }

    async fn spawn_kafka(&mut self, myself: &ActorRef<SinkSupervisorMsg>) -> Result<(), ActorProcessingErr> {
        let Some(outputs) = self.args.kafka.clone() else {
            return Ok(());
        };
        let args = KafkaSinkArgs {
            producer: outputs.producer,
            results_topic: outputs.results_topic,
            alerts_topic: outputs.alerts_topic,
            timeout: outputs.timeout,
            sinks: Arc::clone(&self.args.sinks),
            metrics: Arc::clone(&self.args.metrics),
        };
        let (actor, _) = Actor::spawn_linked(None, KafkaSink, args, myself.get_cell()).await?;
        self.kafka_sink = Some(actor.get_id());
        self.args.sinks.set_kafka(Some(actor));
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
        let mut state = SinkSupervisorState {
            args,
            store_tracker: RestartTracker::default(),
            kafka_tracker: RestartTracker::default(),
            kafka_sink: None,
            shutting_down: false,
        };
        state.spawn_store(&myself).await?;
        state.spawn_kafka(&myself).await?;
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
            SinkSupervisorMsg::RestartKafka => {
                if !state.shutting_down {
                    state.spawn_kafka(&myself).await?;
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
        let is_kafka = state.kafka_sink.is_some() && event.actor_cell().map(|cell| cell.get_id()) == state.kafka_sink;
        let (name, tracker) = if is_kafka {
            state.args.sinks.set_kafka(None);
            state.kafka_sink = None;
            ("kafka", &mut state.kafka_tracker)
        } else {
            state.args.sinks.set_store(None);
            ("store", &mut state.store_tracker)
        };
        if state.shutting_down {
            return Ok(());
        }
        tracing::error!(sink = name, reason = status.message(), "sink actor exited");
        let restart = if is_kafka { SinkSupervisorMsg::RestartKafka } else { SinkSupervisorMsg::RestartStore };
        super::policy::on_child_exit(
            &myself,
            &format!("sink-{name}"),
            &status,
            tracker,
            &state.args.budget,
            &state.args.metrics,
            move || restart,
        )
    }
}
