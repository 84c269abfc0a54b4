//! Producing a simulated stream to a Kafka topic (keyed by sensorId), paced to the wall
//! clock or as fast as the broker takes it.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

use super::Generator;

/// Produce every event; returns how many the broker acknowledged.
///
/// Unpaced (a backlog), the producer fills batches of up to 10,000 messages as a busy
/// producer does; paced, it sends within 10 ms.
pub async fn produce_stream(brokers: &str, topic: &str, generator: Generator, pace: bool) -> anyhow::Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", if pace { "10" } else { "100" })
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .create()?;
    let started = Instant::now();
    let mut origin = None;
    let mut deliveries = Vec::with_capacity(65_536);
    let mut acknowledged = 0;
    let mut line = String::with_capacity(128);
    for event in generator {
        let origin_ms = *origin.get_or_insert(event.emit_ms);
        if pace {
            tokio::time::sleep_until(started + Duration::from_millis((event.emit_ms - origin_ms).max(0) as u64)).await;
        }
        line.clear();
        event.write_json(&mut line);
        let record = FutureRecord::to(topic).key(&*event.sensor_id).payload(line.trim_end());
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((error, _)) => anyhow::bail!("cannot produce to {topic}: {error}"),
        }
        if deliveries.len() >= 65_536 {
            acknowledged += settle(&mut deliveries).await?;
        }
    }
    acknowledged += settle(&mut deliveries).await?;
    Ok(acknowledged)
}

async fn settle(deliveries: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<u64> {
    let mut acknowledged = 0;
    for delivery in deliveries.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => acknowledged += 1,
            Ok(Err((error, _))) => anyhow::bail!("delivery failed: {error}"),
            Err(_) => anyhow::bail!("delivery cancelled"),
        }
    }
    Ok(acknowledged)
}

/// librdkafka's in-process mock cluster served from this process, so other processes
/// (tidemark instances, producers) reach it over loopback TCP as a real broker. It speaks
/// the Kafka protocol, keeps about 100,000 messages (5 MB) per partition, and can fail
/// brokers. Named for what it is: a protocol-level stand-in, not Apache Kafka.
pub struct MockBroker {
    /// The cluster lives in this client's handle.
    client: rdkafka::producer::BaseProducer,
}

impl MockBroker {
    /// `topics`: `name:partitions` pairs. `initial_rebalance_delay`: the broker setting
    /// `group.initial.rebalance.delay.ms` (3 s by default, as on Apache Kafka).
    pub fn start(
        brokers: i32,
        topics: &[(String, i32)],
        initial_rebalance_delay: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let client: rdkafka::producer::BaseProducer =
            ClientConfig::new().set("test.mock.num.brokers", brokers.max(1).to_string()).create()?;
        let broker = Self { client };
        let delay_ms = i32::try_from(initial_rebalance_delay.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the mock cluster belongs to `client`'s handle, which outlives the call;
        // a null cluster (not a mock client) is checked before use.
        unsafe {
            let cluster = rdkafka_sys::rd_kafka_handle_mock_cluster(broker.client.client().native_ptr());
            anyhow::ensure!(!cluster.is_null(), "librdkafka did not create a mock cluster");
            rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, delay_ms);
        }
        for (name, partitions) in topics {
            broker.cluster()?.create_topic(name, (*partitions).max(1), 1)?;
        }
        Ok(broker)
    }

    fn cluster(&self) -> anyhow::Result<rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>> {
        self.client.client().mock_cluster().ok_or_else(|| anyhow::anyhow!("no mock cluster"))
    }

    pub fn bootstrap_servers(&self) -> anyhow::Result<String> {
        Ok(self.cluster()?.bootstrap_servers())
    }

    /// Apply one control line: `down ID`, `up ID`, `rtt ID MILLIS` (added round-trip
    /// time) or `topic NAME PARTITIONS`.
    pub fn control(&self, line: &str) -> anyhow::Result<()> {
        let cluster = self.cluster()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["down", id] => Ok(cluster.broker_down(id.parse()?)?),
            ["up", id] => Ok(cluster.broker_up(id.parse()?)?),
            ["rtt", id, millis] => {
                Ok(cluster.broker_round_trip_time(id.parse()?, std::time::Duration::from_millis(millis.parse()?))?)
            }
            ["topic", name, partitions] => Ok(cluster.create_topic(name, partitions.parse()?, 1)?),
            [] => Ok(()),
            _ => anyhow::bail!(
                "unknown command {line:?}: expected `down ID`, `up ID`, `rtt ID MILLIS` or `topic NAME PARTITIONS`"
            ),
        }
    }
}
