//! Load generation against `POST /api/events`: batched NDJSON or one event per request,
//! from a number of concurrent connections, for a fixed duration; reports achieved
//! events/s and request latency percentiles.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// `batch_size` events per request, as NDJSON.
    Ndjson,
    /// One JSON object per request.
    Single,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub url: String,
    pub mode: LoadMode,
    pub concurrency: usize,
    pub duration: Duration,
    pub batch_size: usize,
    pub sensors: u32,
    /// Target events/s over all connections; `None` as fast as possible.
    pub rate: Option<f64>,
    pub progress: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub mode: String,
    pub concurrency: usize,
    pub batch_size: usize,
    pub seconds: f64,
    pub requests: u64,
    pub events_accepted: u64,
    pub events_per_second: f64,
    pub requests_per_second: f64,
    pub refused_503: u64,
    pub errors: u64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

const EVENT_TYPES: [&str; 4] = ["temperature", "humidity", "pressure", "vibration"];

fn body(mode: LoadMode, batch_size: usize, sensors: u32, counter: &mut u64, out: &mut String) {
    out.clear();
    let now = chrono::Utc::now().timestamp_millis();
    let n = if mode == LoadMode::Single { 1 } else { batch_size };
    for _ in 0..n {
        let sensor = *counter % u64::from(sensors.max(1));
        let kind = EVENT_TYPES[(sensor % 4) as usize];
        let value = 20.0 + (*counter % 97) as f64 * 0.01;
        let _ = writeln!(
            out,
            r#"{{"sensorId":"sensor-{sensor:06}","eventType":"{kind}","value":{value},"timestamp":{now}}}"#
        );
        *counter += 1;
    }
}

/// Run the load and report. Each connection sends its next request as soon as the
/// previous one is answered (closed loop), paced to `rate` if set.
pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    let endpoint = format!("{}/api/events", options.url.trim_end_matches('/'));
    let client = reqwest::Client::builder().pool_max_idle_per_host(options.concurrency).tcp_nodelay(true).build()?;
    let totals = Arc::new(Totals::default());
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let events_per_request = if options.mode == LoadMode::Single { 1 } else { options.batch_size };
    let per_connection_interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(events_per_request as f64 * options.concurrency as f64 / rate.max(1.0)));
    let content_type = match options.mode {
        LoadMode::Ndjson => "application/x-ndjson",
        LoadMode::Single => "application/json",
    };
    let mut tasks = Vec::new();
    for connection in 0..options.concurrency {
        let client = client.clone();
        let endpoint = endpoint.clone();
        let totals = Arc::clone(&totals);
        let latencies = Arc::clone(&latencies);
        let stop = Arc::clone(&stop);
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            let mut counter = connection as u64 * 1_000_003;
            let mut text = String::with_capacity(events_per_request * 110);
            let mut next_send = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(interval) = per_connection_interval {
                    tokio::time::sleep_until(next_send.into()).await;
                    next_send += interval;
                }
                body(options.mode, options.batch_size, options.sensors, &mut counter, &mut text);
                let sent = Instant::now();
                let response = client
                    .post(&endpoint)
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(text.clone())
                    .send()
                    .await;
                let status = match response {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                let micros = sent.elapsed().as_micros() as u64;
                if let Some(local) = local.as_mut() {
                    let _ = local.record(micros.max(1));
                }
                totals.requests.fetch_add(1, Ordering::Relaxed);
                match status {
                    202 => {
                        totals.accepted.fetch_add(events_per_request as u64, Ordering::Relaxed);
                    }
                    503 => {
                        totals.refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            if let Some(local) = local {
                let _ = latencies.lock().add(&local);
            }
        }));
    }
    let bar = options.progress.then(|| {
        let bar = indicatif::ProgressBar::new(options.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last = (Instant::now(), 0u64);
    while started.elapsed() < options.duration {
        tokio::time::sleep(Duration::from_millis(250).min(options.duration.saturating_sub(started.elapsed()))).await;
        if let Some(bar) = &bar {
            let accepted = totals.accepted.load(Ordering::Relaxed);
            let rate = (accepted - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
            last = (Instant::now(), accepted);
            bar.set_position(started.elapsed().as_secs());
            bar.set_message(format!(
                "{rate:>10.0} events/s, {} requests, {} refused, {} errors",
                totals.requests.load(Ordering::Relaxed),
                totals.refused.load(Ordering::Relaxed),
                totals.errors.load(Ordering::Relaxed)
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let latencies = latencies.lock();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let requests = totals.requests.load(Ordering::Relaxed);
    let accepted = totals.accepted.load(Ordering::Relaxed);
    Ok(LoadReport {
        mode: format!("{:?}", options.mode).to_lowercase(),
        concurrency: options.concurrency,
        batch_size: events_per_request,
        seconds,
        requests,
        events_accepted: accepted,
        events_per_second: accepted as f64 / seconds,
        requests_per_second: requests as f64 / seconds,
        refused_503: totals.refused.load(Ordering::Relaxed),
        errors: totals.errors.load(Ordering::Relaxed),
        latency_p50_ms: ms(0.50),
        latency_p95_ms: ms(0.95),
        latency_p99_ms: ms(0.99),
        latency_max_ms: latencies.max() as f64 / 1000.0,
    })
}
