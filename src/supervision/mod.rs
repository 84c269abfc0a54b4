//! The supervision tree:
//!
//! ```text
//! RootSupervisor
//!  ├─ SinkSupervisor ── StoreSink · KafkaSink (results and alerts topics)
//!  ├─ PartitionSupervisor ── PartitionActor 0 … P-1
//!  ├─ SourceSupervisor ── KafkaSource (kafka.enabled) · MqttSource (mqtt.enabled)
//!  └─ GatewayActor (HTTP ingestion, queries, /metrics, /health, /ready)
//! ```
//!
//! Every supervisor handles its children's exits itself (ractor's default would stop
//! the supervisor): a restart policy per child, a restart budget (`supervision.max_restarts`
//! within `supervision.restart_window`), and doubling backoff capped at
//! `supervision.backoff_max`. A child that exhausts its budget fails its supervisor; the
//! root restarts that subtree under the same budget and, when its own budget is spent,
//! stops, so the process exits non-zero and its orchestrator restarts it.

pub mod partition;
pub mod policy;
pub mod sinks;
pub mod sources;

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use self::partition::{PartitionSupervisor, PartitionSupervisorArgs, PartitionSupervisorMsg};
use self::policy::{ExitStatus, RestartBudget, RestartTracker};
use self::sinks::{SinkSupervisor, SinkSupervisorArgs, SinkSupervisorMsg};
use crate::actors::gateway::{AppContext, GatewayActor, GatewayArgs, GatewayMsg};
use crate::actors::partition::PartitionContext;
use crate::actors::sinks::Sinks;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::PartitionRouter;
use crate::store::Store;

/// Current references to the supervisors, for messages across subtrees.
#[derive(Default)]
pub struct Topology {
    partitions: RwLock<Option<ActorRef<PartitionSupervisorMsg>>>,
    sinks: RwLock<Option<ActorRef<SinkSupervisorMsg>>>,
    sources: RwLock<Option<ActorRef<sources::SourceSupervisorMsg>>>,
    gateway: RwLock<Option<ActorRef<GatewayMsg>>>,
}

impl Topology {
    /// Make every partition restart from its last complete checkpoint.
    pub fn rewind_partitions(&self) {
        if let Some(supervisor) = self.partitions.read().as_ref() {
            let _ = supervisor.send_message(PartitionSupervisorMsg::RewindAll);
        }
    }

    /// Tell supervisors not to restart children that stop from now on.
    pub fn shutting_down(&self) {
        if let Some(supervisor) = self.partitions.read().as_ref() {
            let _ = supervisor.send_message(PartitionSupervisorMsg::ShuttingDown);
        }
        if let Some(supervisor) = self.sinks.read().as_ref() {
            let _ = supervisor.send_message(SinkSupervisorMsg::ShuttingDown);
        }
        if let Some(supervisor) = self.sources.read().as_ref() {
            let _ = supervisor.send_message(sources::SourceSupervisorMsg::ShuttingDown);
        }
    }

    pub fn gateway(&self) -> Option<ActorRef<GatewayMsg>> {
        self.gateway.read().clone()
    }

    pub fn partition_supervisor(&self) -> Option<ActorRef<PartitionSupervisorMsg>> {
        self.partitions.read().clone()
    }

    pub fn source_supervisor(&self) -> Option<ActorRef<sources::SourceSupervisorMsg>> {
        self.sources.read().clone()
    }
}

/// Everything needed to (re)build the root's children.
pub struct RuntimeParts {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub router: Arc<PartitionRouter>,
    pub sinks: Arc<Sinks>,
    pub metrics: Arc<Metrics>,
    pub context: Arc<PartitionContext>,
    pub app: Arc<AppContext>,
    pub addr: SocketAddr,
    /// Bound before the tree starts (so the caller learns the port); used by the first
    /// gateway, later ones bind `addr` again.
    pub listener: Mutex<Option<tokio::net::TcpListener>>,
    pub topology: Arc<Topology>,
    /// How restarted partitions get their events (embedded log, or Kafka).
    pub feed: Arc<dyn partition::PartitionFeed>,
    pub assignment: partition::Assignment,
    /// Told when a checkpoint is complete (router; Kafka offset commits).
    pub checkpoint_listener: Arc<dyn crate::actors::sinks::CheckpointListener>,
    /// The Kafka source, when consuming.
    pub kafka: Option<Arc<crate::actors::sources::kafka::KafkaShared>>,
    /// The MQTT source, when enabled.
    pub mqtt: Option<crate::actors::sources::mqtt::MqttSourceArgs>,
    /// Output topics, when configured.
    pub kafka_outputs: Option<sinks::KafkaOutputs>,
    /// The search cluster, when configured.
    pub elasticsearch: Option<Arc<crate::elasticsearch::EsClient>>,
    /// This instance's name (host and process) in the store's partition ownership.
    pub owner: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Child {
    Sinks,
    Partitions,
    Sources,
    Gateway,
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Self::Sinks => "sink-supervisor",
            Self::Partitions => "partition-supervisor",
            Self::Sources => "source-supervisor",
            Self::Gateway => "gateway",
        }
    }
}

pub struct RootSupervisor;

pub enum RootMsg {
    Restart(Child),
    ShuttingDown,
}

pub struct RootState {
    parts: Arc<RuntimeParts>,
    children: Vec<(ActorId, Child)>,
    trackers: std::collections::HashMap<Child, RestartTracker>,
    budget: RestartBudget,
    shutting_down: bool,
}

impl RootState {
    async fn spawn(&mut self, myself: &ActorRef<RootMsg>, child: Child) -> Result<(), ActorProcessingErr> {
        let parts = &self.parts;
        let cell = myself.get_cell();
        let budget = RestartBudget::from_config(&parts.config.supervision);
        let id = match child {
            Child::Sinks => {
                let args = SinkSupervisorArgs {
                    store: Arc::clone(&parts.store),
                    store_config: parts.config.store.clone(),
                    listener: Arc::clone(&parts.checkpoint_listener),
                    metrics: Arc::clone(&parts.metrics),
                    sinks: Arc::clone(&parts.sinks),
                    chaos: parts.config.chaos.clone(),
                    budget,
                    topology: Arc::clone(&parts.topology),
                    kafka: parts.kafka_outputs.clone(),
                    elasticsearch: parts.elasticsearch.clone(),
                };
                let (actor, _) = Actor::spawn_linked(None, SinkSupervisor, args, cell).await?;
                let id = actor.get_id();
                *parts.topology.sinks.write() = Some(actor);
                id
            }
            Child::Partitions => {
                let args = PartitionSupervisorArgs {
                    context: Arc::clone(&parts.context),
                    router: Arc::clone(&parts.router),
                    store: Some(Arc::clone(&parts.store)),
                    owner: parts.owner.clone(),
                    budget,
                    max_event_attempts: parts.config.supervision.max_event_attempts,
                    feed: Arc::clone(&parts.feed),
                    assignment: parts.assignment,
                };
                let (actor, _) = Actor::spawn_linked(None, PartitionSupervisor, args, cell).await?;
                let id = actor.get_id();
                *parts.topology.partitions.write() = Some(actor);
                id
            }
            Child::Sources => {
                if parts.kafka.is_none() && parts.mqtt.is_none() {
                    return Ok(());
                }
                let args = sources::SourceSupervisorArgs {
                    kafka: parts.kafka.clone(),
                    mqtt: parts.mqtt.clone(),
                    metrics: Arc::clone(&parts.metrics),
                    budget,
                };
                let (actor, _) = Actor::spawn_linked(None, sources::SourceSupervisor, args, cell).await?;
                let id = actor.get_id();
                *parts.topology.sources.write() = Some(actor);
                id
            }
            Child::Gateway => {
                let args = GatewayArgs {
                    app: Arc::clone(&parts.app),
                    addr: parts.addr,
                    listener: parts.listener.lock().take(),
                };
                let (actor, _) = Actor::spawn_linked(None, GatewayActor, args, cell).await?;
                let id = actor.get_id();
                *parts.topology.gateway.write() = Some(actor);
                id
            }
        };
        self.children.push((id, child));
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = Arc<RuntimeParts>;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        parts: Arc<RuntimeParts>,
    ) -> Result<RootState, ActorProcessingErr> {
        let budget = RestartBudget::from_config(&parts.config.supervision);
        let mut state =
            RootState { parts, children: Vec::new(), trackers: Default::default(), budget, shutting_down: false };
        // Sinks first: partitions emit into them; sources and the gateway last: they
        // feed partitions.
        for child in [Child::Sinks, Child::Partitions, Child::Sources, Child::Gateway] {
            state.spawn(&myself, child).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        message: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RootMsg::Restart(child) => {
                if !state.shutting_down {
                    tracing::warn!(child = child.name(), "restarting subtree");
                    state.spawn(&myself, child).await?;
                }
            }
            RootMsg::ShuttingDown => state.shutting_down = true,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(status) = ExitStatus::of(&event) else {
            return Ok(());
        };
        let Some(cell) = event.actor_cell() else {
            return Ok(());
        };
        let id = cell.get_id();
        let Some(index) = state.children.iter().position(|(child_id, _)| *child_id == id) else {
            return Ok(());
        };
        let (_, child) = state.children.remove(index);
        if state.shutting_down {
            return Ok(());
        }
        tracing::error!(child = child.name(), reason = status.message(), "subtree exited");
        let tracker = state.trackers.entry(child).or_default();
        policy::on_child_exit(&myself, child.name(), &status, tracker, &state.budget, &state.parts.metrics, move || {
            RootMsg::Restart(child)
        })
    }
}
