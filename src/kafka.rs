//! librdkafka client settings for tidemark's consumer and producers.
//!
//! Our defaults come first, then the operator's `kafka.properties` (security, SASL, TLS,
//! tuning: any librdkafka setting), then the few settings correctness depends on, which
//! cannot be overridden: offsets are committed by tidemark, only for complete
//! checkpoints, and producers are idempotent with `acks=all`.

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

fn base(kafka: &KafkaConfig, defaults: &[(&str, String)], forced: &[(&str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    config.set("client.id", "tidemark");
    for (key, value) in defaults {
        config.set(*key, value);
    }
    for (key, value) in kafka.librdkafka_properties() {
        config.set(key, value);
    }
    for (key, value) in forced {
        config.set(*key, value);
    }
    config
}

/// The consumer of `kafka.topic` in group `kafka.group_id`.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    base(
        kafka,
        &[
            ("auto.offset.reset", "earliest".into()),
            ("statistics.interval.ms", "1000".into()),
            // A member that stops heartbeating loses its partitions after 10 s; heartbeats
            // every second let a rebalance reach every member within about a second.
            ("session.timeout.ms", "10000".into()),
            ("heartbeat.interval.ms", "1000".into()),
            ("fetch.wait.max.ms", "50".into()),
            // librdkafka pauses fetching for fetch.queue.backoff.ms (1 s) whenever its
            // local queue holds queued.min.messages, which with one consumer queue for all
            // partitions happens on every backlog: fetch again after 10 ms instead.
            ("fetch.queue.backoff.ms", "10".into()),
            ("queued.min.messages", "200000".into()),
        ],
        &[
            ("group.id", kafka.group_id.clone()),
            // Offsets follow complete checkpoints, committed by tidemark.
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.partition.eof", "false".into()),
        ],
    )
}

/// The producer of HTTP ingestion (`ingest.mode = "kafka"`), output topics and the
/// dead-letter topic.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    base(
        kafka,
        &[
            ("linger.ms", "5".into()),
            // Java's default partitioner: a sensor's events land where the embedded router
            // (and any Java producer keyed by sensorId) puts them.
            ("partitioner", "murmur2_random".into()),
            ("compression.type", "lz4".into()),
            ("message.timeout.ms", kafka.produce_timeout.as_millis().to_string()),
        ],
        &[("enable.idempotence", "true".into()), ("acks", "all".into())],
    )
}

/// The events of the last `per_partition` messages of each partition of `kafka.topic`
/// (an MQTT bridge seeds its redelivery memory with them after a restart). Reads with a
/// group-less consumer, commits nothing, and gives up after `timeout` with what it read.
pub fn topic_tail(
    kafka: &KafkaConfig,
    per_partition: i64,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<crate::messages::Event>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = base(
        kafka,
        &[("fetch.wait.max.ms", "50".into())],
        &[
            ("group.id", format!("{}-tail", kafka.group_id)),
            ("enable.auto.commit", "false".into()),
            ("enable.partition.eof", "false".into()),
        ],
    )
    .create()?;
    let metadata = consumer.fetch_metadata(Some(&kafka.topic), timeout)?;
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == kafka.topic) else {
        return Ok(Vec::new());
    };
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for partition in topic.partitions() {
        let (low, high) = consumer.fetch_watermarks(&kafka.topic, partition.id(), timeout)?;
        if high > low {
            assignment.add_partition_offset(
                &kafka.topic,
                partition.id(),
                Offset::Offset((high - per_partition).max(low)),
            )?;
            ends.insert(partition.id(), high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut events = Vec::new();
    while !ends.is_empty() && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(std::time::Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if let Ok(event) =
            crate::ingest::parse::parse_event(message.payload().unwrap_or_default(), Default::default(), i64::MAX / 2)
        {
            events.push(event);
        }
        if ends.get(&message.partition()).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&message.partition());
        }
    }
    Ok(events)
}

/// The low and high watermarks librdkafka cached for a partition from its last fetch
/// response (no request to the broker; rdkafka only offers the fetching variant).
pub fn cached_watermarks<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the handle lives as long as `client`; the topic name is a valid C string
    // for the call; librdkafka writes two i64s and keeps no pointer.
    let error = unsafe {
        rdkafka_sys::rd_kafka_get_watermark_offsets(client.native_ptr(), topic.as_ptr(), partition, &mut low, &mut high)
    };
    (error == rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some((low, high))
}

/// The dead-letter topic: malformed input messages are republished there unchanged,
/// keyed as they were, with headers saying why and where they came from.
pub struct DeadLetterTopic {
    pub producer: rdkafka::producer::FutureProducer,
    pub source_topic: String,
    pub topic: String,
}

impl crate::actors::partition::RejectedMessages for DeadLetterTopic {
    fn publish(&self, letter: &crate::messages::DeadLetter, payload: &[u8], key: Option<&[u8]>) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let partition = letter.partition.map(|p| p.to_string()).unwrap_or_default();
        let offset = letter.position.map(|p| p.to_string()).unwrap_or_default();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "tidemark.reason", value: Some(letter.reason.as_str()) })
            .insert(Header { key: "tidemark.error", value: Some(letter.error.as_str()) })
            .insert(Header { key: "tidemark.source.topic", value: Some(self.source_topic.as_str()) })
            .insert(Header { key: "tidemark.source.partition", value: Some(partition.as_str()) })
            .insert(Header { key: "tidemark.source.offset", value: Some(offset.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        // At least once: the store keeps the dead letter exactly once with the checkpoint.
        if let Err((error, _)) = self.producer.send_result(record) {
            tracing::warn!(error = %error, partition = %partition, offset = %offset, "cannot queue a message for the dead-letter topic");
        }
    }
}

/// HTTP ingestion in Kafka mode (`ingest.mode = "kafka"`): each event is one record on
/// `kafka.topic`, keyed by `sensorId` (the producer's murmur2 partitioner places a sensor
/// where the embedded router would), and a request is accepted once the broker
/// acknowledged every record (idempotent producer, `acks=all`).
pub struct KafkaIngest {
    pub producer: rdkafka::producer::FutureProducer,
    pub topic: String,
    pub timeout: std::time::Duration,
}

/// The producer span of a traced request (a child of it).
fn produce_span(topic: &str, records: usize) -> tracing::Span {
    if !crate::telemetry::enabled() || crate::telemetry::TraceContext::of(&tracing::Span::current()).is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        target: crate::telemetry::TARGET,
        "kafka.produce",
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.destination.name = topic,
        messaging.batch.message_count = records,
    )
}

#[async_trait::async_trait]
impl crate::ingest::Ingest for KafkaIngest {
    async fn accept(&self, events: Vec<crate::messages::Event>) -> Result<(), crate::ingest::IngestRefusal> {
        let span = produce_span(&self.topic, events.len());
        let headers = crate::telemetry::TraceContext::of(&span).map(trace_headers);
        tracing::Instrument::instrument(self.produce(events, headers), span).await
    }
}

impl KafkaIngest {
    async fn produce(
        &self,
        events: Vec<crate::messages::Event>,
        headers: Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<(), crate::ingest::IngestRefusal> {
        use rdkafka::producer::FutureRecord;
        let total = events.len();
        let mut deliveries = Vec::with_capacity(total);
        let mut payload = String::with_capacity(128);
        for event in &events {
            payload.clear();
            event_json(event, &mut payload);
            let mut record = FutureRecord::to(&self.topic)
                .key(event.sensor_id.as_str())
                .payload(payload.as_str())
                .timestamp(event.ingest_ms);
            if let Some(headers) = &headers {
                record = record.headers(headers.clone());
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => {
                    let acknowledged = count_acknowledged(deliveries, self.timeout).await;
                    return Err(crate::ingest::IngestRefusal::BrokerUnavailable {
                        acknowledged,
                        total,
                        reason: error.to_string(),
                    });
                }
            }
        }
        let acknowledged = count_acknowledged(deliveries, self.timeout).await;
        if acknowledged == total {
            Ok(())
        } else {
            Err(crate::ingest::IngestRefusal::BrokerUnavailable {
                acknowledged,
                total,
                reason: format!("{} deliveries failed", total - acknowledged),
            })
        }
    }
}

/// The W3C `traceparent` header of a record produced inside a traced span.
pub fn trace_headers(trace: crate::telemetry::TraceContext) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::Header;
    let value = trace.traceparent();
    rdkafka::message::OwnedHeaders::new_with_capacity(1).insert(Header { key: TRACEPARENT, value: Some(&value) })
}

/// The header (and MQTT user property) a trace context travels in.
pub const TRACEPARENT: &str = "traceparent";

/// An event as the JSON object a message on `kafka.topic` holds.
pub fn event_json(event: &crate::messages::Event, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        r#"{{"sensorId":{},"eventType":{},"value":{},"timestamp":{}}}"#,
        serde_json::Value::from(event.sensor_id.as_str()),
        serde_json::Value::from(event.event_type.as_str()),
        serde_json::Value::from(event.value),
        event.timestamp_ms
    );
}

async fn count_acknowledged(deliveries: Vec<rdkafka::producer::DeliveryFuture>, timeout: std::time::Duration) -> usize {
    match tokio::time::timeout(timeout, futures::future::join_all(deliveries)).await {
        Ok(results) => results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigSources};

    #[test]
    fn operators_configure_security_but_not_offset_handling() {
        let config = Config::load(
            &ConfigSources::default()
                .with("kafka.properties.security_protocol", "SASL_SSL")
                .with("kafka.properties.enable_auto_commit", "true")
                .with("kafka.properties.acks", "1"),
        )
        .expect("valid");
        let consumer = consumer_config(&config.kafka);
        assert_eq!(consumer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        let producer = producer_config(&config.kafka);
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("security.protocol"), Some("SASL_SSL"));
    }
}
