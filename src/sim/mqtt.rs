//! Publishing a simulated stream over MQTT, as devices do: QoS 1, one client per device
//! group, each on a persistent session that survives a broker restart (rumqttc re-sends
//! what the broker had not acknowledged).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::SimEvent;
use crate::config::MqttConfig;

/// One publishing client.
pub struct Publisher {
    client: AsyncClient,
    sent: u64,
    acknowledged: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connect with `config`'s URL, credentials and TLS settings under `client_id`.
    pub fn connect(config: &MqttConfig, client_id: &str) -> anyhow::Result<Self> {
        let mut config = config.clone();
        config.client_id = client_id.to_string();
        let mut options = crate::mqtt::options(&config).map_err(|error| anyhow::anyhow!(error))?;
        options.set_manual_acks(false).set_request_channel_capacity(1024);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let acknowledged = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicU64::new(0));
        let task = {
            let acknowledged = Arc::clone(&acknowledged);
            let connected = Arc::clone(&connected);
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        // The broker is away (restarting): the client reconnects on the
                        // next poll and re-sends what was not acknowledged.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        Ok(Self { client, sent: 0, acknowledged, connected, task })
    }

    /// Queue one QoS 1 message (waits while the client's window is full).
    pub async fn send(&mut self, topic: String, payload: impl Into<Bytes>) -> anyhow::Result<()> {
        self.client.publish_bytes(topic, QoS::AtLeastOnce, false, payload.into()).await?;
        self.sent += 1;
        Ok(())
    }

    /// Connections made so far (more than one: it reconnected).
    pub fn connections(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Wait until the broker acknowledged everything sent (at most `timeout`), then
    /// disconnect; returns how many were acknowledged.
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        while self.acknowledged.load(Ordering::Relaxed) < self.sent {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the broker acknowledged {} of {} messages within {timeout:?}",
                self.acknowledged.load(Ordering::Relaxed),
                self.sent
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        Ok(self.sent)
    }
}

/// The topic of `event` under `pattern` (`{sensorId}` and `{eventType}` filled in).
pub fn topic_for(pattern: &str, sensor_id: &str, event_type: &str) -> String {
    pattern.replace("{sensorId}", sensor_id).replace("{eventType}", event_type)
}

/// Publish every event over `publishers` clients (a sensor always on the same one, so
/// its readings stay in order), paced to the stream's clock or as fast as the broker
/// takes them. Returns how many the broker acknowledged.
pub async fn publish_stream(
    config: &MqttConfig,
    topic_pattern: &str,
    events: impl Iterator<Item = SimEvent>,
    publishers: usize,
    pace: bool,
) -> anyhow::Result<u64> {
    let count = publishers.max(1);
    let mut clients = (0..count)
        .map(|index| Publisher::connect(config, &format!("{}-pub-{index}", config.client_id)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    let mut origin = None;
    let mut line = String::with_capacity(128);
    for event in events {
        let origin_ms = *origin.get_or_insert(event.emit_ms);
        if pace {
            tokio::time::sleep_until(started + Duration::from_millis((event.emit_ms - origin_ms).max(0) as u64)).await;
        }
        line.clear();
        event.write_json(&mut line);
        let client = crate::routing::partition_for(&event.sensor_id, count as u32) as usize;
        let topic = topic_for(topic_pattern, &event.sensor_id, event.event_type);
        clients[client].send(topic, line.trim_end().as_bytes().to_vec()).await?;
    }
    let mut acknowledged = 0;
    for client in clients {
        acknowledged += client.finish(Duration::from_secs(120)).await?;
    }
    Ok(acknowledged)
}
