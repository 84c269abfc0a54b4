//! Operations endpoints: `/health`, `/ready`, `/metrics`, `/api/status`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppContext;

/// `GET /health` — the process is alive and serving.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready` — the store answers, every sink is writing, the sources run, and every
/// partition this instance serves has a running actor. 503 otherwise, listing what is
/// not ready.
pub async fn ready(State(app): State<Arc<AppContext>>) -> Response {
    let mut problems: Vec<String> = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => problems.push(format!("store: {error}")),
        Err(_) => problems.push("store: no answer within 2s".into()),
    }
    let store_sink = app.sinks.store_health.snapshot("store");
    if !store_sink.healthy {
        problems.push(format!(
            "store sink: {} consecutive write failures ({})",
            store_sink.consecutive_failures,
            store_sink.last_error.as_deref().unwrap_or("unknown error")
        ));
    }
    if app.sinks.store().is_none() {
        problems.push("store sink: restarting".into());
    }
    if app.sinks.elasticsearch_configured() {
        let es = app.sinks.elasticsearch_health.snapshot("elasticsearch");
        if !es.healthy {
            problems.push(format!(
                "elasticsearch sink: {} consecutive failures; checkpoints wait for it ({})",
                es.consecutive_failures,
                es.last_error.as_deref().unwrap_or("unknown error")
            ));
        }
        if app.sinks.elasticsearch().is_none() {
            problems.push("elasticsearch sink: restarting".into());
        }
    }
    for source in &app.sources {
        problems.extend(source.problems());
    }
    if let Some(failure) = app.router.disk_log().and_then(|log| log.failure()) {
        problems.push(format!("ingest log: {failure}"));
    }
    // Only the partitions this instance serves: in a consumer group the others belong
    // to other members, and a member with none is still ready to answer queries.
    for partition in app.owned_partitions() {
        if app.router.actor(partition).is_none() {
            problems.push(format!("partition {partition}: restarting"));
        }
    }
    if app.router.is_closed() {
        problems.push("shutting down".into());
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "problems": problems}))).into_response()
    }
}

/// The API described as OpenAPI 3 (`api/openapi.json`, checked against the running
/// server by schemathesis in `scripts/test.sh`).
pub const OPENAPI: &str = include_str!("../../../api/openapi.json");

/// `GET /api/openapi.json`.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `GET /metrics` — OpenMetrics, or Prometheus' classic text format, as `Accept` asks.
pub async fn metrics(State(app): State<Arc<AppContext>>, headers: header::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|value| value.to_str().ok());
    let (content_type, body) = app.metrics.render_as(crate::metrics::Exposition::negotiate(accept));
    ([(header::CONTENT_TYPE, content_type), (header::VARY, "accept")], body).into_response()
}

/// `GET /api/status` — partitions (restarts, checkpoints, replay buffers, in-flight
/// events), sinks, and pipeline latencies.
pub async fn status(State(app): State<Arc<AppContext>>) -> Json<Value> {
    Json(status_body(&app))
}

/// The body of `GET /api/status` (also what `status` subscribers of `/ws` receive).
pub fn status_body(app: &AppContext) -> Value {
    let mut partitions = Vec::new();
    for partition in app.owned_partitions() {
        let slot = app.router.status(partition);
        // Published by the actor after each batch: no message that would wait behind
        // the events queued for it.
        let actor_status = app.router.progress(partition).status();
        partitions.push(json!({
            "partition": partition,
            "live": slot.live,
            "restarts": slot.restarts,
            "nextPosition": slot.next_position,
            "processedPosition": slot.processed_position,
            "inFlightEvents": slot.in_flight_events,
            "replayBufferEvents": slot.replay_buffer_events,
            "unconfirmedEvents": slot.unconfirmed_events,
            "replayBufferLimit": slot.replay_buffer_limit,
            "lastCheckpoint": {"position": slot.last_checkpoint_position, "id": slot.last_checkpoint_id},
            "openKeys": actor_status.as_ref().map(|s| s.open_keys),
            "openWindows": actor_status.as_ref().map(|s| s.open_windows),
            "windowsFired": actor_status.as_ref().map(|s| s.windows_fired),
            // Every position the partition's state covers and where it went (checkpointed,
            // so replays never count twice): consumed = processed + deadLettered + skipped.
            "positions": actor_status.as_ref().map(|s| json!({
                "first": s.counters.base_position,
                "consumed": s.next_position.saturating_sub(s.counters.base_position),
                "processed": s.counters.events_processed,
                "late": s.counters.events_late,
                "deadLettered": s.counters.dead_lettered,
                "skipped": s.counters.skipped,
            })),
        }));
    }
    let latency = |latency: &crate::metrics::Latency| {
        let (count, q) = latency.quantiles(&[0.5, 0.95, 0.99]);
        let ms = |v: Option<f64>| v.map(|s| s * 1000.0);
        json!({"count": count, "p50Ms": ms(q[0]), "p95Ms": ms(q[1]), "p99Ms": ms(q[2])})
    };
    let mut sinks = vec![app.sinks.store_health.snapshot("store")];
    if app.sinks.elasticsearch_configured() {
        sinks.push(app.sinks.elasticsearch_health.snapshot("elasticsearch"));
    }
    let metrics = &app.metrics;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "timestamp": crate::store::ser::rfc3339(chrono::Utc::now().timestamp_millis()),
        "uptimeSeconds": app.started_at.elapsed().as_secs(),
        "store": app.store.backend(),
        "acceptingEvents": !app.router.is_closed(),
        "replayBufferEvents": app.router.buffered_total(),
        "partitions": partitions,
        // Totals since start over every source (rates: differences over time).
        "events": {
            "received": metrics.events_received.total(),
            "accepted": metrics.events_accepted.total(),
            "rejected": metrics.events_rejected.total(),
        },
        "websocketConnections": app.sinks.live().open_connections(),
        "sinks": sinks,
        "search": app.search.name(),
        "kafka": app.sources.iter().find(|source| source.name() == "kafka").map(|kafka| kafka.status()),
        "mqtt": app.sources.iter().find(|source| source.name() == "mqtt").map(|mqtt| mqtt.status()),
        "latency": {
            "ingestToWindowFire": latency(&app.metrics.ingest_to_fire),
            "windowFireToStoreAck": latency(&app.metrics.fire_to_ack),
            "windowFireToWebSocketSend": latency(&app.metrics.ws_fire_to_send),
        },
    })
}
