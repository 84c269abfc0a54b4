//! The sink supervisor: runs the sink actors and restarts a failed one. A sink that dies
//! loses the batch it held, so after restarting it the partitions are rewound to their
//! last complete checkpoints and emit everything after them again (idempotently).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::Topology;
use super::policy::{ExitStatus, RestartBudget, RestartTracker};
use crate::actors::sinks::elasticsearch::{EsSink, EsSinkArgs};
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
    /// The search cluster (when configured).
    pub elasticsearch: Option<Arc<crate::elasticsearch::EsClient>>,
}

#[derive(Clone)]
pub struct KafkaOutputs {
    pub producer: rdkafka::producer::FutureProducer,
    pub results_topic: Option<String>,
    pub alerts_topic: Option<String>,
    pub timeout: std::time::Duration,
}

/// The sink actors this supervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Store,
    Kafka,
    Elasticsearch,
}

impl SinkKind {
    fn name(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Kafka => "kafka",
            Self::Elasticsearch => "elasticsearch",
        }
    }
}

pub enum SinkSupervisorMsg {
    Restart(SinkKind),
    ShuttingDown,
}

pub struct SinkSupervisorState {
    args: SinkSupervisorArgs,
    /// The running sinks, by actor, with their restart history.
    children: Vec<(SinkKind, Option<ractor::ActorId>, RestartTracker)>,
    shutting_down: bool,
}

impl SinkSupervisorState {
    async fn spawn(&mut self, kind: SinkKind, myself: &ActorRef<SinkSupervisorMsg>) -> Result<(), ActorProcessingErr> {
        let id = match kind {
            SinkKind::Store => self.spawn_store(myself).await?,
            SinkKind::Kafka => self.spawn_kafka(myself).await?,
            SinkKind::Elasticsearch => self.spawn_elasticsearch(myself).await?,
        };
        if let Some(id) = id {
            match self.children.iter_mut().find(|(child, _, _)| *child == kind) {
                Some(entry) => entry.1 = Some(id),
                None => self.children.push((kind, Some(id), RestartTracker::default())),
            }
        }
        Ok(())
    }

    fn set_actor_gone(&self, kind: SinkKind) {
        match kind {
            SinkKind::Store => self.args.sinks.set_store(None),
            SinkKind::Kafka => self.args.sinks.set_kafka(None),
            SinkKind::Elasticsearch => self.args.sinks.set_elasticsearch(None),
        }
    }

    async fn spawn_elasticsearch(
        &self,
        myself: &ActorRef<SinkSupervisorMsg>,
    ) -> Result<Option<ractor::ActorId>, ActorProcessingErr> {
        let Some(client) = self.args.elasticsearch.clone() else {
            return Ok(None);
        };
        let args = EsSinkArgs {
            client,
            sinks: Arc::clone(&self.args.sinks),
            metrics: Arc::clone(&self.args.metrics),
            health: Arc::clone(&self.args.sinks.elasticsearch_health),
        };
        let (actor, _) = Actor::spawn_linked(None, EsSink, args, myself.get_cell()).await?;
        let id = actor.get_id();
        self.args.sinks.set_elasticsearch(Some(actor));
        Ok(Some(id))
    }

    async fn spawn_store(
        &self,
        myself: &ActorRef<SinkSupervisorMsg>,
    ) -> Result<Option<ractor::ActorId>, ActorProcessingErr> {
        let args = StoreSinkArgs {
            store: Arc::clone(&self.args.store),
            config: self.args.store_config.clone(),
            listener: Arc::clone(&self.args.listener),
            metrics: Arc::clone(&self.args.metrics),
            health: Arc::clone(&self.args.sinks.store_health),
            live: Arc::clone(self.args.sinks.live()),
            chaos: self.args.chaos.clone(),
        };
        // What a failed sink held is gone; what the new one receives is counted afresh.
        self.args.sinks.store_health.pending_dead_letters.store(0, std::sync::atomic::Ordering::Relaxed);
        let (actor, _) = Actor::spawn_linked(None, StoreSink, args, myself.get_cell()).await?;
        let id = actor.get_id();
        self.args.sinks.set_store(Some(actor));
        Ok(Some(id))
    }

    async fn spawn_kafka(
        &self,
        myself: &ActorRef<SinkSupervisorMsg>,
    ) -> Result<Option<ractor::ActorId>, ActorProcessingErr> {
        let Some(outputs) = self.args.kafka.clone() else {
            return Ok(None);
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
        let id = actor.get_id();
        self.args.sinks.set_kafka(Some(actor));
        Ok(Some(id))
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
        let mut state = SinkSupervisorState { args, children: Vec::new(), shutting_down: false };
        for kind in [SinkKind::Store, SinkKind::Kafka, SinkKind::Elasticsearch] {
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
            SinkSupervisorMsg::Restart(kind) => {
                if !state.shutting_down {
                    state.spawn(kind, &myself).await?;
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
        let exited = event.actor_cell().map(|cell| cell.get_id());
        let Some(index) = state.children.iter().position(|(_, id, _)| id.is_some() && *id == exited) else {
            return Ok(());
        };
        let kind = state.children[index].0;
        state.children[index].1 = None;
        state.set_actor_gone(kind);
        if state.shutting_down {
            return Ok(());
        }
        let name = kind.name();
        tracing::error!(sink = name, reason = status.message(), "sink actor exited");
        let tracker = &mut state.children[index].2;
        super::policy::on_child_exit(
            &myself,
            &format!("sink-{name}"),
            &status,
            tracker,
            &state.args.budget,
            &state.args.metrics,
            move || SinkSupervisorMsg::Restart(kind),
        )
    }
}
