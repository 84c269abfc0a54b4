//! Posting a simulated stream to `POST /api/events`, paced to the wall clock.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use super::{Generator, SimEvent};

/// Totals of a posting run.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostStats {
    pub requests: u64,
    pub events_sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// 503 answers that were retried after `Retry-After`.
    pub retries: u64,
    pub failures: u64,
}

/// Post the generator's events as NDJSON batches, one batch per `slice` of stream time,
/// sending each batch when the wall clock reaches it (so event times track real time).
/// With `pace = false` batches go out as fast as the server takes them.
pub async fn post_stream(
    client: &reqwest::Client,
    url: &str,
    mut generator: Generator,
    slice: Duration,
    pace: bool,
    mut on_batch: impl FnMut(&PostStats),
) -> PostStats {
    let endpoint = format!("{}/api/events", url.trim_end_matches('/'));
    let mut stats = PostStats::default();
    let started = Instant::now();
    let slice_ms = slice.as_millis().max(1) as i64;
    let mut pending: Option<SimEvent> = generator.next();
    let Some(first) = pending.as_ref() else {
        return stats;
    };
    let origin_ms = first.emit_ms;
    let mut slice_end = origin_ms + slice_ms;
    loop {
        let mut body = String::new();
        let mut count = 0u64;
        while let Some(event) = pending.as_ref() {
            if event.emit_ms >= slice_end {
                break;
            }
            event.write_json(&mut body);
            count += 1;
            pending = generator.next();
        }
        if pace {
            tokio::time::sleep_until(started + Duration::from_millis((slice_end - origin_ms) as u64)).await;
        }
        if count > 0 {
            send_batch(client, &endpoint, body, count, &mut stats).await;
            on_batch(&stats);
        }
        if pending.is_none() {
            return stats;
        }
        slice_end += slice_ms;
    }
}

async fn send_batch(client: &reqwest::Client, endpoint: &str, body: String, count: u64, stats: &mut PostStats) {
    for _attempt in 0..30 {
        stats.requests += 1;
        let response = client
            .post(endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(response) if response.status() == StatusCode::ACCEPTED => {
                stats.events_sent += count;
                if let Ok(answer) = response.json::<serde_json::Value>().await {
                    stats.accepted += answer["accepted"].as_u64().unwrap_or(0);
                    stats.rejected += answer["rejected"].as_u64().unwrap_or(0);
                }
                return;
            }
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                stats.retries += 1;
                tokio::time::sleep(Duration::from_secs(wait.min(10))).await;
            }
            Ok(response) => {
                stats.failures += 1;
                tracing::warn!(status = %response.status(), "batch refused");
                return;
            }
            Err(error) => {
                stats.failures += 1;
                tracing::warn!(error = %error, "cannot reach tidemark; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
