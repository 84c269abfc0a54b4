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
use crate::actors::sinks::{CheckpointListener, CheckpointListeners, Sinks};
use crate::actors::sources::kafka::KafkaShared;
use crate::config::{Config, IngestMode};
use crate::ingest::ParseLimits;
use crate::messages::{PartitionMsg, StoreMsg};
use crate::metrics::Metrics;
use crate::router::{LogMode, PartitionRouter};
use crate::scoring::Scoring;
use crate::store::{self, Store};
use crate::supervision::partition::{Assignment, PartitionFeed};
use crate::supervision::sinks::KafkaOutputs;
use crate::supervision::sources::SourceSupervisorMsg;
use crate::supervision::{RootMsg, RootSupervisor, RuntimeParts, Topology};
use rdkafka::producer::FutureProducer;

/// How often the ingest clock ticks partitions that receive no events.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// Refuse to start when `kafka.topic` exists with another partition count than
/// `pipeline.partitions` (each Kafka partition is one partition actor, and checkpoints are
/// keyed by partition). A broker that cannot be reached yet is not an error here: the
/// source checks again when it connects.
async fn check_topic_partitions(producer: FutureProducer, config: &Config) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let topic = config.kafka.topic.clone();
    let lookup = topic.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        producer.client().fetch_metadata(Some(&lookup), Duration::from_secs(5)).map(|metadata| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == lookup && t.error().is_none())
                .map(|t| t.partitions().len() as u32)
        })
    })
    .await?;
    match metadata {
        Ok(Some(count)) if count > 0 && count != config.pipeline.partitions => {
            anyhow::bail!(crate::actors::sources::kafka::partition_count_mismatch(
                &topic,
                count,
                config.pipeline.partitions
            ))
        }
        Ok(_) => Ok(()),
        Err(error) => {
            tracing::warn!(topic = %topic, error = %error, "cannot read the topic's metadata at start-up");
            Ok(())
        }
    }
}

/// This instance's name for operators: host name and process id.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}:{}", std::process::id())
}

/// A running instance.
pub struct Runtime {
    parts: Arc<RuntimeParts>,
    root: ActorRef<RootMsg>,
    root_handle: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
    /// Dead-letter retention.
    pruner: JoinHandle<()>,
}

/// What a graceful shutdown achieved.
#[derive(Debug)]
pub struct ShutdownReport {
    pub partitions_checkpointed: usize,
    /// Partitions still running when the checkpoints were taken.
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
        let kafka_consume = config.kafka.enabled;
        let mut mqtt_seed = Vec::new();
        let router = PartitionRouter::new(
            config.pipeline.partitions,
            config.pipeline.max_buffered_events,
            // With Kafka the topic is the log: nothing to keep in memory for replays.
            if kafka_consume { LogMode::External } else { LogMode::Replay },
            Arc::clone(&metrics),
        );
        let router = Arc::new(
            if !kafka_consume
                && config.ingest.mode == IngestMode::Embedded
                && config.ingest.durability != crate::config::Durability::Memory
            {
                let dir = config.ingest_log_dir();
                let (log, recovered) = crate::ingest::log::IngestLog::open(
                    &dir,
                    config.pipeline.partitions,
                    config.ingest.durability,
                    config.ingest.log_segment_bytes,
                    metrics.ingest_log.clone(),
                )
                .context("cannot open the ingest log (ingest.log_dir)")?;
                let logged: usize = recovered
                    .iter()
                    .flatten()
                    .map(|entry| match entry {
                        crate::ingest::log::Recovered::Events(events) => events.len(),
                        crate::ingest::log::Recovered::Tick { .. } => 0,
                    })
                    .sum();
                tracing::info!(dir = %dir.display(), logged_events = logged, durability = ?config.ingest.durability, "ingest log open");
                if config.mqtt.enabled {
                    mqtt_seed = crate::mqtt::seed_from_log(&recovered, config.mqtt.dedup_window);
                }
                router.with_disk_log(Arc::new(log), recovered)
            } else {
                router
            },
        );
        let outputs_configured = !config.kafka.results_topic.is_empty() || !config.kafka.alerts_topic.is_empty();
        let mqtt_to_kafka = config.mqtt.enabled
            && (config.mqtt.forward == crate::config::MqttForward::Kafka || config.ingest.mode == IngestMode::Kafka);
        let producer =
            if kafka_consume || outputs_configured || config.ingest.mode == IngestMode::Kafka || mqtt_to_kafka {
                Some(
                    crate::kafka::producer_config(&config.kafka)
                        .create::<FutureProducer>()
                        .context("cannot create the Kafka producer")?,
                )
            } else {
                None
            };
        if let (Some(producer), true) = (&producer, kafka_consume) {
            check_topic_partitions(producer.clone(), &config).await?;
        }
        let elasticsearch = if config.elasticsearch.enabled {
            Some(Arc::new(crate::elasticsearch::EsClient::new(&config.elasticsearch).map_err(|e| anyhow::anyhow!(e))?))
        } else {
            None
        };
        let live = crate::live::LiveHub::new(config.ws.clone(), Arc::clone(&metrics));
        live.start();
        let sinks = Arc::new(Sinks::with_outputs(live, outputs_configured, elasticsearch.is_some()));
        let topology = Arc::new(Topology::default());
        let kafka = kafka_consume.then(|| {
            Arc::new(KafkaShared::new(
                Arc::clone(&config),
                Arc::clone(&router),
                Arc::clone(&metrics),
                Arc::clone(&sinks),
                Arc::clone(&topology),
                tokio::runtime::Handle::current(),
            ))
        });
        let (feed, assignment, checkpoint_listener): (Arc<dyn PartitionFeed>, Assignment, Arc<dyn CheckpointListener>) =
            match &kafka {
                Some(kafka) => (
                    Arc::clone(kafka) as Arc<dyn PartitionFeed>,
                    Assignment::Dynamic,
                    Arc::new(CheckpointListeners(vec![
                        Arc::clone(&router) as Arc<dyn CheckpointListener>,
                        Arc::clone(kafka) as Arc<dyn CheckpointListener>,
                    ])),
                ),
                None => (
                    Arc::clone(&router) as Arc<dyn PartitionFeed>,
                    Assignment::All,
                    Arc::clone(&router) as Arc<dyn CheckpointListener>,
                ),
            };
        let kafka_outputs = match (&producer, outputs_configured) {
            (Some(producer), true) => Some(KafkaOutputs {
                producer: producer.clone(),
                results_topic: Some(config.kafka.results_topic.clone()).filter(|t| !t.is_empty()),
                alerts_topic: Some(config.kafka.alerts_topic.clone()).filter(|t| !t.is_empty()),
                timeout: config.kafka.produce_timeout,
            }),
            _ => None,
        };
        let rules = Arc::new(crate::rules::RulesHandle::new(crate::rules::Rules::from_config(&config.rules)));
        let context = Arc::new(PartitionContext {
            limits: ParseLimits::from_config(&config),
            raw_source: match (&producer, kafka_consume) {
                (Some(producer), true) => Some(crate::actors::partition::RawSource {
                    source: crate::messages::Source::Kafka,
                    origin: config.kafka.topic.clone(),
                    rejects: Some(Arc::new(crate::kafka::DeadLetterTopic {
                        producer: producer.clone(),
                        source_topic: config.kafka.topic.clone(),
                        topic: config.kafka.dlq_topic(),
                    })),
                }),
                _ => None,
            },
            partitions: config.pipeline.partitions,
            windowing: crate::window::Windowing::from_config(&config.pipeline),
            rules: Arc::clone(&rules),
            scoring: Scoring::from_config(&config.scoring),
            checkpoint_interval: config.checkpoint.interval,
            checkpoint_max_events: config.checkpoint.max_events,
            metrics: Arc::clone(&metrics),
            sinks: Arc::clone(&sinks),
            chaos: config.chaos.clone(),
            key_limits: crate::actors::partition::KeyLimits::from_config(&config.pipeline),
        });
        let keys = Arc::new(
            crate::auth::KeyRing::from_config(&config.auth)
                .map_err(|errors| anyhow::anyhow!("invalid API keys:\n  {}", errors.join("\n  ")))?,
        );
        if !keys.is_enabled() && !config.listen_addr().ip().is_loopback() && !config.http.allow_unauthenticated {
            anyhow::bail!(
                "http.listen {} is not a loopback address and no API keys are configured: anyone who can reach it \
                 could ingest and read. Add auth.api_keys (tidemark hash-key makes one), or set \
                 http.allow_unauthenticated = true if something in front authenticates",
                config.http.listen
            );
        }
        let tls =
            crate::tls::GatewayTls::from_config(&config.http).map_err(|error| anyhow::anyhow!(error))?.map(Arc::new);
        let listener = tokio::net::TcpListener::bind(config.listen_addr())
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", config.http.listen))?;
        let addr = listener.local_addr()?;
        let kafka_ingest = |producer: &FutureProducer| -> Arc<dyn crate::ingest::Ingest> {
            Arc::new(crate::kafka::KafkaIngest {
                producer: producer.clone(),
                topic: config.kafka.topic.clone(),
                timeout: config.kafka.produce_timeout,
            })
        };
        let http_ingest: Arc<dyn crate::ingest::Ingest> = match &producer {
            Some(producer) if config.ingest.mode == IngestMode::Kafka => kafka_ingest(producer),
            _ => Arc::clone(&router) as Arc<dyn crate::ingest::Ingest>,
        };
        if mqtt_to_kafka {
            // A bridge's redeliveries are recognised against the topic's newest messages.
            let kafka_config = config.kafka.clone();
            let per_partition = i64::try_from(config.mqtt.dedup_window).unwrap_or(i64::MAX);
            match tokio::task::spawn_blocking(move || {
                crate::kafka::topic_tail(&kafka_config, per_partition, Duration::from_secs(10))
            })
            .await
            {
                Ok(Ok(events)) => mqtt_seed = events.iter().map(crate::mqtt::identity).collect(),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read the topic's tail: MQTT redeliveries of the previous run may be published twice")
                }
                Err(error) => tracing::warn!(%error, "reading the topic's tail failed"),
            }
        }
        let mqtt = if config.mqtt.enabled {
            let shared = Arc::new(
                crate::mqtt::MqttShared::new(&config, Arc::clone(&metrics), mqtt_seed)
                    .map_err(|e| anyhow::anyhow!(e))?,
            );
            // Fail at start-up on unreadable certificates rather than in a restart loop.
            crate::mqtt::options(&config.mqtt).map_err(|e| anyhow::anyhow!(e))?;
            let ingest: Arc<dyn crate::ingest::Ingest> = match &producer {
                Some(producer) if mqtt_to_kafka => kafka_ingest(producer),
                // No durable log: an acknowledgement waits for the checkpoint.
                _ if router.disk_log().is_none() => Arc::new(crate::router::CheckpointedIngest(Arc::clone(&router))),
                _ => Arc::clone(&http_ingest),
            };
            Some(crate::actors::sources::mqtt::MqttSourceArgs {
                shared,
                ingest,
                rejects: Arc::clone(&sinks) as Arc<dyn crate::mqtt::RejectSink>,
                limits: ParseLimits::from_config(&config),
                // A batch is accepted whole or refused whole: it must fit a partition's share.
                batch_size: if mqtt_to_kafka {
                    config.mqtt.batch_size
                } else {
                    config.mqtt.batch_size.min((router.limit() / 2).max(1))
                },
                withhold_acks: cfg!(feature = "chaos") && config.chaos.mqtt_withhold_acks,
            })
        } else {
            None
        };
        let mut sources: Vec<Arc<dyn crate::ingest::SourceStatus>> =
            kafka.iter().map(|kafka| Arc::clone(kafka) as Arc<dyn crate::ingest::SourceStatus>).collect();
        if let Some(mqtt) = &mqtt {
            sources.push(Arc::clone(&mqtt.shared) as Arc<dyn crate::ingest::SourceStatus>);
        }
        let app = Arc::new(AppContext {
            rules: Arc::clone(&rules),
            config: Arc::clone(&config),
            router: Arc::clone(&router),
            store: Arc::clone(&store),
            sinks: Arc::clone(&sinks),
            metrics: Arc::clone(&metrics),
            limits: ParseLimits::from_config(&config),
            rate_limiter: crate::ratelimit::ClientLimiter::new(
                config.http.rate_limit_per_second,
                config.http.rate_limit_burst,
            ),
            started_at: Instant::now(),
            ingest: http_ingest,
            sources,
            search: match &elasticsearch {
                Some(client) => Arc::clone(client) as Arc<dyn crate::search::SearchBackend>,
                None => Arc::new(crate::store::StoreSearch(Arc::clone(&store))),
            },
            keys,
            tls,
            dead_letter_sampler: crate::ingest::sampling::DeadLetterSampler::new(
                config.dead_letters.sample_limit,
                config.dead_letters.sample_window,
            )
            .map(Arc::new),
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
            topology,
            feed,
            assignment,
            checkpoint_listener,
            kafka,
            mqtt,
            kafka_outputs,
            elasticsearch,
            owner: instance_name(),
        });
        let (root, root_handle) = Actor::spawn(None, RootSupervisor, Arc::clone(&parts))
            .await
            .map_err(|error| anyhow::anyhow!("cannot start the supervision tree: {error}"))?;
        let pruner = {
            let store = Arc::clone(&parts.store);
            let router = Arc::clone(&router);
            let settings = parts.config.dead_letters.clone();
            let sampler = parts.app.dead_letter_sampler.clone();
            let sinks = Arc::clone(&parts.sinks);
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(settings.prune_every);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    if router.is_closed() {
                        break;
                    }
                    if let Some(sampler) = &sampler {
                        let summaries = sampler.flush(chrono::Utc::now().timestamp_millis());
                        if !summaries.is_empty()
                            && sinks.send_store(crate::messages::StoreMsg::DeadLetters(summaries)).is_err()
                        {
                            tracing::warn!("store sink unavailable: sampled dead-letter summaries not written");
                        }
                    }
                    let retention_ms = i64::try_from(settings.retention.as_millis()).unwrap_or(i64::MAX);
                    let older_than = chrono::Utc::now().timestamp_millis().saturating_sub(retention_ms);
                    match store.prune_dead_letters(older_than, settings.max_rows).await {
                        Ok(0) => {}
                        Ok(deleted) => tracing::info!(deleted, "dead letters past their retention deleted"),
                        Err(error) => tracing::warn!(%error, "dead-letter retention failed; retrying next round"),
                    }
                }
            })
        };
        let ticker = tokio::spawn(async move {
            if kafka_consume {
                return; // the Kafka source ticks its partitions itself
            }
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
        Ok(Self { parts, root, root_handle: Some(root_handle), ticker, pruner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.parts.addr
    }

    pub fn config(&self) -> &Config {
        &self.parts.config
    }

    /// The alert rules in force: [`crate::rules::RulesHandle::replace`] reloads them.
    pub fn rules(&self) -> Arc<crate::rules::RulesHandle> {
        Arc::clone(&self.parts.context.rules)
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

    /// The running partition supervisor (tests restart the partition tree through it).
    pub fn partition_supervisor(
        &self,
    ) -> Option<ractor::ActorRef<crate::supervision::partition::PartitionSupervisorMsg>> {
        self.parts.topology.partition_supervisor()
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
        self.parts.topology.shutting_down();
        let _ = self.root.send_message(RootMsg::ShuttingDown);
        // The sources first, while the pipeline still takes events: MQTT acknowledges
        // what it handed over and disconnects; Kafka leaves the group, its revocation
        // checkpointing every partition and committing its offset before releasing it.
        if let Some(sources) = self.parts.topology.source_supervisor() {
            let _ = sources.call(SourceSupervisorMsg::StopSources, Some(remaining())).await;
        }
        router.close();

        // Partitions still running (with Kafka, leaving the group already checkpointed and
        // released this instance's partitions).
        let actors: Vec<_> = (0..router.partitions()).filter_map(|partition| router.actor(partition)).collect();
        let partitions = actors.len();
        let mut checkpointed = 0;
        let calls = actors.into_iter().map(|actor| {
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
        self.pruner.abort();
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
