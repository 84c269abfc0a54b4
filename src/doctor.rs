//! `tidemark doctor`: checks what a deployment depends on — the configuration, the store
//! and its schema, the clock against the store's, Kafka (brokers, topic, partitions,
//! consumer-group lag), MQTT and Elasticsearch — and reports each with what to do. It
//! only reads: no migration, no topic, no template, no offset is changed, so it can run
//! beside live instances (e.g. as a Kubernetes init container).

use std::fmt;
use std::time::Duration;

use crate::config::{Config, redact_url};

/// How long one check may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A clock further than this from the store's is reported (windows are event-time, but
/// ingest times, idle flushing and `created_at` columns use the local clock).
const MAX_SKEW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
            Self::Skip => "skip",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check { name, status, detail: detail.into() });
    }

    /// Whether any check failed (warnings do not fail).
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|check| check.status == Status::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let mut lines = check.detail.lines();
            writeln!(f, "{:<5} {:<14} {}", check.status.label(), check.name, lines.next().unwrap_or_default())?;
            for line in lines {
                writeln!(f, "{:20} {line}", "")?;
            }
        }
        let failed = self.checks.iter().filter(|c| c.status == Status::Fail).count();
        let warned = self.checks.iter().filter(|c| c.status == Status::Warn).count();
        match (failed, warned) {
            (0, 0) => writeln!(f, "\nall checks passed"),
            (0, w) => writeln!(f, "\nno failure, {w} warning(s)"),
            (n, w) => writeln!(f, "\n{n} check(s) failed, {w} warning(s)"),
        }
    }
}

/// A report for a configuration that does not load: nothing else can be checked.
pub fn invalid_configuration(errors: &crate::config::ConfigErrors) -> Report {
    let mut report = Report::default();
    report.add("configuration", Status::Fail, errors.0.join("\n"));
    report
}

/// Run every check of `config`.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    report.add("configuration", Status::Ok, "valid (`tidemark check-config` prints the effective settings)");
    store(config, &mut report).await;
    kafka(config, &mut report).await;
    mqtt(config, &mut report).await;
    elasticsearch(config, &mut report).await;
    report
}

async fn store(config: &Config, report: &mut Report) {
    let url = redact_url(&config.store.url);
    let inspection = match tokio::time::timeout(TIMEOUT, crate::store::inspect(&config.store)).await {
        Ok(Ok(inspection)) => inspection,
        Ok(Err(error)) => {
            report.add("store", Status::Fail, format!("{url}: {error}"));
            report.add("clock", Status::Skip, "the store is not reachable");
            return;
        }
        Err(_) => {
            report.add("store", Status::Fail, format!("{url}: no answer within {}s", TIMEOUT.as_secs()));
            report.add("clock", Status::Skip, "the store is not reachable");
            return;
        }
    };
    let latest = inspection.known.last().copied().unwrap_or(0);
    let applied = inspection.applied.last().copied().unwrap_or(0);
    let unknown: Vec<i64> = inspection.applied.iter().filter(|v| !inspection.known.contains(v)).copied().collect();
    let (status, detail) = if !unknown.is_empty() {
        (
            Status::Fail,
            format!(
                "{url}: schema has migrations {unknown:?} this version does not know: a newer tidemark migrated it; run \
                 that version"
            ),
        )
    } else if inspection.missing_database {
        (Status::Warn, format!("{url}: does not exist yet; `tidemark migrate` (or the first start) creates it"))
    } else if applied < latest {
        (
            Status::Warn,
            format!(
                "{url}: reachable, schema at migration {applied} of {latest}; `tidemark migrate` (or the next start) \
                 applies the rest"
            ),
        )
    } else {
        (Status::Ok, format!("{url}: reachable, schema at migration {applied} of {latest}"))
    };
    report.add("store", status, detail);
    match inspection.clock_ms {
        None => report.add("clock", Status::Skip, "the store is a local file: same clock"),
        Some(store_ms) => {
            let skew_ms = chrono::Utc::now().timestamp_millis() - store_ms;
            let side = if skew_ms >= 0 { "ahead of" } else { "behind" };
            let detail = format!("this machine's clock is {} ms {side} the store's", skew_ms.abs());
            let status = if skew_ms.unsigned_abs() > MAX_SKEW.as_millis() as u64 { Status::Warn } else { Status::Ok };
            let detail = if status == Status::Warn {
                format!("{detail} (more than {} s): check NTP on both", MAX_SKEW.as_secs())
            } else {
                detail
            };
            report.add("clock", status, detail);
        }
    }
}

async fn kafka(config: &Config, report: &mut Report) {
    if !config.kafka.enabled {
        report.add("kafka", Status::Skip, "kafka.enabled = false");
        return;
    }
    let kafka = config.kafka.clone();
    let partitions = config.pipeline.partitions;
    let checked = tokio::task::spawn_blocking(move || kafka_checks(&kafka, partitions)).await;
    match checked {
        Ok(checks) => {
            for (status, detail) in checks {
                report.add("kafka", status, detail);
            }
        }
        Err(error) => report.add("kafka", Status::Fail, format!("the check itself failed: {error}")),
    }
}

fn kafka_checks(kafka: &crate::config::KafkaConfig, partitions: u32) -> Vec<(Status, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let mut checks = Vec::new();
    let consumer: BaseConsumer = match crate::kafka::consumer_config(kafka).create() {
        Ok(consumer) => consumer,
        Err(error) => return vec![(Status::Fail, format!("cannot create a client: {error}"))],
    };
    let metadata = match consumer.fetch_metadata(Some(&kafka.topic), TIMEOUT) {
        Ok(metadata) => metadata,
        Err(error) => {
            return vec![(
                Status::Fail,
                format!("brokers {} not reachable within {}s: {error}", kafka.brokers, TIMEOUT.as_secs()),
            )];
        }
    };
    checks.push((Status::Ok, format!("{} broker(s) reachable at {}", metadata.brokers().len(), kafka.brokers)));
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == kafka.topic) else {
        checks.push((Status::Fail, format!("topic {} is not in the cluster's metadata", kafka.topic)));
        return checks;
    };
    if let Some(error) = topic.error() {
        checks.push((
            Status::Fail,
            format!(
                "topic {}: {}; create it with {partitions} partitions (kafka-topics.sh --create --topic {} --partitions \
                 {partitions})",
                kafka.topic,
                rdkafka::error::RDKafkaErrorCode::from(error),
                kafka.topic
            ),
        ));
        return checks;
    }
    let count = topic.partitions().len() as u32;
    if count == partitions {
        checks.push((Status::Ok, format!("topic {} has {count} partitions = pipeline.partitions", kafka.topic)));
    } else {
        checks.push((
            Status::Fail,
            format!(
                "topic {} has {count} partitions but pipeline.partitions = {partitions}: set pipeline.partitions = \
                 {count} (TIDEMARK__PIPELINE__PARTITIONS={count}); tidemark refuses to start otherwise",
                kafka.topic
            ),
        ));
    }
    // The output topics must exist (the brokers are not asked to create topics); the
    // dead-letter topic only matters once a message is malformed.
    if let Ok(all) = consumer.fetch_metadata(None, TIMEOUT) {
        let exists = |name: &str| all.topics().iter().any(|t| t.name() == name && t.error().is_none());
        for (key, topic, missing) in [
            ("kafka.results_topic", kafka.results_topic.clone(), Status::Fail),
            ("kafka.alerts_topic", kafka.alerts_topic.clone(), Status::Fail),
            ("kafka.dlq_topic", kafka.dlq_topic(), Status::Warn),
        ] {
            if topic.is_empty() {
                continue;
            }
            if exists(&topic) {
                checks.push((Status::Ok, format!("{key} {topic} exists")));
            } else {
                checks.push((
                    missing,
                    format!("{key} {topic} does not exist: create it (the brokers do not create topics for tidemark)"),
                ));
            }
        }
    }
    let mut list = TopicPartitionList::new();
    for partition in topic.partitions() {
        list.add_partition(&kafka.topic, partition.id());
    }
    match consumer.committed_offsets(list, TIMEOUT) {
        Ok(committed) => {
            let mut lag = 0i64;
            let mut uncommitted = 0;
            for element in committed.elements() {
                let (low, high) =
                    consumer.fetch_watermarks(&kafka.topic, element.partition(), TIMEOUT).unwrap_or((0, 0));
                match element.offset() {
                    Offset::Offset(offset) => lag += (high - offset).max(0),
                    _ => {
                        uncommitted += 1;
                        lag += (high - low).max(0);
                    }
                }
            }
            let note = if uncommitted > 0 {
                format!(" ({uncommitted} partition(s) without a committed offset, counted from the earliest)")
            } else {
                String::new()
            };
            checks.push((Status::Ok, format!("consumer group {}: lag {lag} message(s){note}", kafka.group_id)));
        }
        Err(error) => {
            checks.push((Status::Warn, format!("consumer group {}: offsets not readable: {error}", kafka.group_id)))
        }
    }
    checks
}

async fn mqtt(config: &Config, report: &mut Report) {
    if !config.mqtt.enabled {
        report.add("mqtt", Status::Skip, "mqtt.enabled = false");
        return;
    }
    let url = redact_url(&config.mqtt.url);
    let mut options = match crate::mqtt::options(&config.mqtt) {
        Ok(options) => options,
        Err(error) => {
            report.add("mqtt", Status::Fail, error);
            return;
        }
    };
    // Its own client id and a clean session: the running instance's session is not touched.
    options.set_client_id(format!("{}-doctor", config.mqtt.client_id)).set_clean_start(true);
    options.set_session_expiry_interval(None);
    let (client, mut connection) = rumqttc::v5::AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(TIMEOUT, async {
        loop {
            match connection.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    match outcome {
        Ok(Ok(())) => report.add("mqtt", Status::Ok, format!("{url}: connected (MQTT 5)")),
        Ok(Err(error)) => report.add("mqtt", Status::Fail, format!("{url}: {error}")),
        Err(_) => report.add("mqtt", Status::Fail, format!("{url}: no CONNACK within {}s", TIMEOUT.as_secs())),
    }
}

async fn elasticsearch(config: &Config, report: &mut Report) {
    if !config.elasticsearch.enabled {
        report.add("elasticsearch", Status::Skip, "elasticsearch.enabled = false");
        return;
    }
    let client = match crate::elasticsearch::EsClient::new(&config.elasticsearch) {
        Ok(client) => client,
        Err(error) => {
            report.add("elasticsearch", Status::Fail, error);
            return;
        }
    };
    let urls = config.elasticsearch.urls.iter().map(|url| redact_url(url)).collect::<Vec<_>>().join(", ");
    match tokio::time::timeout(TIMEOUT, client.health()).await {
        Ok(Ok(status)) if status == "red" => {
            report.add("elasticsearch", Status::Fail, format!("{urls}: cluster health is red"));
        }
        Ok(Ok(status)) => report.add("elasticsearch", Status::Ok, format!("{urls}: cluster health is {status}")),
        Ok(Err(error)) => {
            report.add("elasticsearch", Status::Fail, format!("{urls}: {error}"));
            return;
        }
        Err(_) => {
            report.add("elasticsearch", Status::Fail, format!("{urls}: no answer within {}s", TIMEOUT.as_secs()));
            return;
        }
    }
    if config.elasticsearch.template.is_empty() {
        report.add("elasticsearch", Status::Skip, "no index template configured (elasticsearch.template)");
        return;
    }
    match tokio::time::timeout(TIMEOUT, client.template_exists()).await {
        Ok(Ok(true)) => {
            report.add("elasticsearch", Status::Ok, format!("index template {} exists", config.elasticsearch.template));
        }
        Ok(Ok(false)) => report.add(
            "elasticsearch",
            Status::Warn,
            format!(
                "index template {} does not exist yet; the sink applies it at start",
                config.elasticsearch.template
            ),
        ),
        Ok(Err(error)) => report.add("elasticsearch", Status::Warn, format!("index template: {error}")),
        Err(_) => report.add("elasticsearch", Status::Warn, "index template: no answer"),
    }
}
