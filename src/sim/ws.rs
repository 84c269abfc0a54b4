//! `tidemark-sim ws-clients`: many WebSocket clients of the live feed at once (the
//! fan-out benchmark). Each subscribes, reads everything, and measures how long after
//! its row was stored (`updatedAt`) each prediction or alert arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

pub struct WsClientOptions {
    /// `ws://host:port/ws` (with `?access_token=` when the gateway wants a key).
    pub url: String,
    /// Clients subscribed to every alert.
    pub alerts: usize,
    /// Clients subscribed to every prediction.
    pub predictions: usize,
    pub duration: Duration,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WsClientReport {
    pub connected: u64,
    pub failed_to_connect: u64,
    pub closed_by_server: u64,
    pub alerts_received: u64,
    pub predictions_received: u64,
    pub lagged_messages: u64,
    pub missed: u64,
    /// Stored (`updatedAt`) to received, milliseconds (clock of one machine).
    pub store_to_client_p50_ms: f64,
    pub store_to_client_p99_ms: f64,
    pub store_to_client_max_ms: f64,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    alerts: AtomicU64,
    predictions: AtomicU64,
    lagged: AtomicU64,
    missed: AtomicU64,
}

pub async fn run(options: WsClientOptions) -> anyhow::Result<WsClientReport> {
    let counters = Arc::new(Counters::default());
    let latency = Arc::new(parking_lot::Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?));
    let deadline = tokio::time::Instant::now() + options.duration;
    let mut clients = Vec::new();
    let kinds =
        std::iter::repeat_n("alerts", options.alerts).chain(std::iter::repeat_n("predictions", options.predictions));
    for (n, kind) in kinds.enumerate() {
        let url = options.url.clone();
        let counters = Arc::clone(&counters);
        let latency = Arc::clone(&latency);
        clients.push(tokio::spawn(async move {
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            counters.connected.fetch_add(1, Ordering::Relaxed);
            let request = serde_json::json!({"subscribe": {"id": format!("c{n}"), "kind": kind}});
            if socket.send(Message::text(request.to_string())).await.is_err() {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut local = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).ok();
            loop {
                let message = tokio::select! {
                    message = socket.next() => message,
                    () = tokio::time::sleep_until(deadline) => break,
                };
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        counters.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
                match value["kind"].as_str() {
                    Some("alerts") => counters.alerts.fetch_add(1, Ordering::Relaxed),
                    Some("predictions") => counters.predictions.fetch_add(1, Ordering::Relaxed),
                    Some("lagged") => {
                        counters.missed.fetch_add(value["data"]["missed"].as_u64().unwrap_or(0), Ordering::Relaxed);
                        counters.lagged.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => continue,
                };
                if let (Some(stored), Some(histogram)) = (
                    value["data"]["updatedAt"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                    local.as_mut(),
                ) {
                    let delay = chrono::Utc::now().timestamp_millis() - stored.timestamp_millis();
                    histogram.saturating_record(delay.max(1) as u64);
                }
            }
            if let Some(local) = local {
                let _ = latency.lock().add(&local);
            }
            let _ = socket.close(None).await;
        }));
    }
    for client in clients {
        let _ = client.await;
    }
    let latency = latency.lock();
    let quantile = |q: f64| if latency.is_empty() { 0.0 } else { latency.value_at_quantile(q) as f64 };
    Ok(WsClientReport {
        connected: counters.connected.load(Ordering::Relaxed),
        failed_to_connect: counters.failed.load(Ordering::Relaxed),
        closed_by_server: counters.closed.load(Ordering::Relaxed),
        alerts_received: counters.alerts.load(Ordering::Relaxed),
        predictions_received: counters.predictions.load(Ordering::Relaxed),
        lagged_messages: counters.lagged.load(Ordering::Relaxed),
        missed: counters.missed.load(Ordering::Relaxed),
        store_to_client_p50_ms: quantile(0.5),
        store_to_client_p99_ms: quantile(0.99),
        store_to_client_max_ms: if latency.is_empty() { 0.0 } else { latency.max() as f64 },
    })
}
