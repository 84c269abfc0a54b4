//! Producing a simulated stream to a Kafka topic (keyed by sensorId), paced to the wall
//! clock or as fast as the broker takes it.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::Instant;

use super::Generator;

/// Produce every event; returns how many the broker acknowledged.
pub async fn produce_stream(brokers: &str, topic: &str, generator: Generator, pace: bool) -> anyhow::Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("compression.type", "lz4")
        .create()?;
    let started = Instant::now();
    let mut origin = None;
    let mut deliveries = Vec::with_capacity(4096);
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
        if deliveries.len() >= 4096 {
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
