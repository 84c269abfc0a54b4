//! Assembling and running one tidemark instance: store, router, supervision tree,
//! ingest clock; and its graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;

use crate::actors::gateway::AppContext;
use crate::actors::partition::PartitionContext;
use crate::actors::sinks::Sinks;
use crate::config::Config;
use crate::ingest::ParseLimits;
use crate::messages::{PartitionMsg, StoreMsg};
use crate::metrics::Metrics;
use crate::router::PartitionRouter;
use crate::scoring::Scoring;
use crate::store::{self, Store};
use crate::supervision::{RootMsg, RootSupervisor, RuntimeParts, Topology};
use crate::window::WindowSpec;

/// How often the ingest clock ticks partitions that receive no events.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// A running instance.
pub struct Runtime {
    parts: Arc<RuntimeParts>,
    root: ActorRef<RootMsg>,
    root_handle: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

/// What a graceful shutdown achieved.
#[derive(Debug)]
pub struct ShutdownReport {
    pub partitions_checkpointed: usize,
    pub partitions: usize,
    pub sink_drained: bool,
    pub took: Duration,
}

impl Runtime {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let store = store::open(&config.store)
            .await
            .with_context(|| format!("cannot open store {}", crate::config::redact_url(&config.store.url)))?;
        let router = Arc::new(PartitionRouter::new(
            config.pipeline.partitions,
            config.pipeline.max_buffered_events,
            true,
            Arc::clone(&metrics),
        ));
        let sinks = Arc::new(Sinks::new(4096));
        let context = Arc::new(PartitionContext {
            partitions: config.pipeline.partitions,
            spec: WindowSpec::from_config(&config.pipeline),
            scoring: Scoring::from_config(&config.scoring),
            checkpoint_interval: config.checkpoint.interval,
            checkpoint_max_events: config.checkpoint.max_events,
            metrics: Arc::clone(&metrics),
            sinks: Arc::clone(&sinks),
            chaos: config.chaos.clone(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen_addr())
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", config.http.listen))?;
        let addr = listener.local_addr()?;
        let app = Arc::new(AppContext {
            config: Arc::clone(&config),
            router: Arc::clone(&router),
            store: Arc::clone(&store),
            sinks: Arc::clone(&sinks),
            metrics: Arc::clone(&metrics),
            limits: ParseLimits { max_string_bytes: config.ingest.max_string_bytes },
            started_at: Instant::now(),
        });
        let parts = Arc::new(RuntimeParts {
            config,
            store,
            router: Arc::clone(&router),
            sinks,
            metrics,
            context,
            app,
            addr,
            listener: Mutex::new(Some(listener)),
            topology: Arc::new(Topology::default()),
        });
        let (root, root_handle) = Actor::spawn(None, RootSupervisor, Arc::clone(&parts))
            .await
            .map_err(|error| anyhow::anyhow!("cannot start the supervision tree: {error}"))?;
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if router.is_closed() {
                    break;
                }
                router.tick(chrono::Utc::now().timestamp_millis());
            }
        });
        tracing::info!(
            %addr,
            store = parts.store.backend(),
            partitions = parts.config.pipeline.partitions,
            window = %humantime::format_duration(parts.config.pipeline.window),
            "tidemark is running"
        );
        Ok(Self { parts, root, root_handle: Some(root_handle), ticker })
    }

    pub fn addr(&self) -> SocketAddr {
        self.parts.addr
    }

    pub fn config(&self) -> &Config {
        &self.parts.config
    }

    pub fn router(&self) -> &Arc<PartitionRouter> {
        &self.parts.router
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.parts.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.parts.metrics
    }

    pub fn sinks(&self) -> &Arc<Sinks> {
        &self.parts.sinks
    }

    /// Fire every open window and wait until the store sink has written everything
    /// (the end of a bounded input: `replay`, tests).
    pub async fn flush_all(&self, timeout: Duration) -> anyhow::Result<()> {
        let router = &self.parts.router;
        for partition in 0..router.partitions() {
            let actor =
                router.actor(partition).ok_or_else(|| anyhow::anyhow!("partition {partition} has no running actor"))?;
            let reply = actor
                .call(PartitionMsg::FlushAll, Some(timeout))
                .await
                .map_err(|error| anyhow::anyhow!("partition {partition}: {error}"))?;
            anyhow::ensure!(reply.is_success(), "partition {partition} did not flush within {timeout:?}");
        }
        self.flush_sinks(timeout).await
    }

    /// Wait until the store sink has written everything sent to it so far.
    pub async fn flush_sinks(&self, timeout: Duration) -> anyhow::Result<()> {
        let sink = self.parts.sinks.store().ok_or_else(|| anyhow::anyhow!("the store sink is not running"))?;
        let reply =
            sink.call(StoreMsg::Flush, Some(timeout)).await.map_err(|error| anyhow::anyhow!("store sink: {error}"))?;
        anyhow::ensure!(reply.is_success(), "store sink did not flush within {timeout:?}");
        Ok(())
    }

    /// Resolves when the supervision tree stopped on its own (a subtree exhausted the
    /// root's restart budget): the process should exit non-zero.
    pub async fn stopped(&mut self) {
        match self.root_handle.as_mut() {
            Some(handle) => {
                let _ = handle.await;
                self.root_handle = None;
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// Stop accepting, checkpoint every partition (open windows included), drain the
    /// store sink, stop the tree; within `shutdown.timeout`.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + self.parts.config.shutdown.timeout;
        let remaining = || deadline.saturating_duration_since(Instant::now());
        let router = &self.parts.router;
        router.close();
        self.parts.topology.shutting_down();
        let _ = self.root.send_message(RootMsg::ShuttingDown);

        let partitions = router.partitions() as usize;
        let mut checkpointed = 0;
        let calls = (0..router.partitions()).filter_map(|partition| router.actor(partition)).map(|actor| {
            let timeout = remaining();
            async move {
                actor
                    .call(PartitionMsg::CheckpointAndReply, Some(timeout))
                    .await
                    .map(|reply| reply.is_success())
                    .unwrap_or(false)
            }
        });
        for ok in futures::future::join_all(calls).await {
            checkpointed += usize::from(ok);
        }
        let sink_drained = match self.parts.sinks.store() {
            Some(sink) => sink
                .call(StoreMsg::Flush, Some(remaining().max(Duration::from_millis(1))))
                .await
                .map(|reply| reply.is_success())
                .unwrap_or(false),
            None => false,
        };
        self.ticker.abort();
        self.root.stop(Some("shutdown".into()));
        if let Some(handle) = self.root_handle.take() {
            let _ = tokio::time::timeout(remaining().max(Duration::from_millis(100)), handle).await;
        }
        self.parts.store.close().await;
        let report =
            ShutdownReport { partitions_checkpointed: checkpointed, partitions, sink_drained, took: started.elapsed() };
        tracing::info!(
            partitions_checkpointed = report.partitions_checkpointed,
            partitions = report.partitions,
            sink_drained = report.sink_drained,
            took_ms = report.took.as_millis() as u64,
            "tidemark stopped"
        );
        report
    }
}
