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
            ("session.timeout.ms", "10000".into()),
            ("heartbeat.interval.ms", "1000".into()),
            ("fetch.wait.max.ms", "50".into()),
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
