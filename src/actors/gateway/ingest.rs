//! `POST /api/events`: one JSON object, a JSON array, or NDJSON.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppContext;
use super::error::ApiError;
use crate::ingest::{BodyFormat, IngestRefusal, Parsed, Rejection, parse_body};
use crate::messages::{DeadLetter, MAX_DEAD_LETTER_PAYLOAD, RejectReason, Source, StoreMsg, truncate_payload};
use crate::metrics::{RejectLabels, SourceLabels};

/// Bodies larger than this are parsed on the blocking pool, off the async workers.
const INLINE_PARSE_LIMIT: usize = 256 * 1024;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestResponse {
    pub accepted: usize,
    pub rejected: usize,
    pub errors: Vec<IngestError>,
    /// Set when more events were rejected than are listed (all are dead-lettered).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub errors_truncated: bool,
}

#[derive(Serialize)]
pub struct IngestError {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    pub reason: &'static str,
    pub error: String,
}

/// Whether reading the body failed on `http.body_read_timeout`.
fn is_timeout(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() || error.to_string().contains("timed out") {
            return true;
        }
        source = error.source();
    }
    false
}

pub async fn post_events(
    State(app): State<Arc<AppContext>>,
    client: Option<axum::Extension<crate::ratelimit::ClientId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !crate::telemetry::enabled() {
        return accept_events(app, client, headers, body).await;
    }
    // The request's span continues the caller's `traceparent` (or starts a trace,
    // sampled by ratio); the router, partitions and sinks continue it.
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "POST /api/events",
        trace_id = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/api/events",
        http.request.body.size = body.as_ref().map_or(0, Bytes::len),
        http.response.status_code = tracing::field::Empty,
    );
    let parent = headers
        .get(crate::kafka::TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .and_then(crate::telemetry::TraceContext::parse);
    crate::telemetry::follow(&span, parent.as_slice());
    let outcome = tracing::Instrument::instrument(accept_events(app, client, headers, body), span.clone()).await;
    let status = match &outcome {
        Ok(response) => response.status(),
        Err(error) => error.status,
    };
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    outcome
}

async fn accept_events(
    app: Arc<AppContext>,
    client: Option<axum::Extension<crate::ratelimit::ClientId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "request body is larger than http.max_body_bytes ({} bytes); split it into smaller batches",
                    app.config.http.max_body_bytes
                ),
            )
        } else if is_timeout(&rejection) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within http.body_read_timeout ({})",
                    humantime::format_duration(app.config.http.body_read_timeout)
                ),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the request body could not be read")
        }
    })?;
    if app.router.is_closed() {
        return Err(ApiError::unavailable(
            "shutting_down",
            "tidemark is shutting down; retry against another instance",
            5,
        ));
    }
    if app.sinks.store().is_none() {
        return Err(ApiError::unavailable("store_sink_restarting", "the store sink is restarting; retry shortly", 1));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let Some(format) = BodyFormat::from_content_type(content_type) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {}: send application/json (an event or an array of events) or application/x-ndjson \
                 (one event per line)",
                content_type.map_or_else(|| "missing".to_string(), |c| format!("{c:?}"))
            ),
        ));
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let limits = app.limits;
    let parsed = if body.len() > INLINE_PARSE_LIMIT {
        let body = body.clone();
        tokio::task::spawn_blocking(move || parse_body(&body, format, limits, now_ms))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "parsing failed"))?
    } else {
        parse_body(&body, format, limits, now_ms)
    };
    let source = SourceLabels { source: "http" };
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            app.metrics.events_received.get_or_create(&source).inc();
            count_rejection(&app, RejectReason::Unparsable);
            let letter = DeadLetter {
                received_at_ms: now_ms,
                source: Source::Http,
                reason: RejectReason::Unparsable,
                error: error.to_string(),
                sensor_id: None,
                event_type: None,
                event_time_ms: None,
                partition: None,
                position: None,
                payload: truncate_payload(&String::from_utf8_lossy(&body), MAX_DEAD_LETTER_PAYLOAD),
            };
            send_dead_letters(&app, vec![letter]);
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", error.to_string()));
        }
    };
    let Parsed { events, rejected } = parsed;
    if rejected.len() > app.config.dead_letters.max_pending {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request has {} invalid events, more than dead_letters.max_pending ({}) can ever hold; fix or \
                 split it",
                rejected.len(),
                app.config.dead_letters.max_pending
            ),
        ));
    }
    let pending = app.sinks.store_health.pending_dead_letters.load(std::sync::atomic::Ordering::Relaxed);
    if !rejected.is_empty() && pending as usize + rejected.len() > app.config.dead_letters.max_pending {
        // Rejected events are kept, and keeping them costs memory until the store has
        // them: a flood of invalid events is refused like any other overload.
        app.metrics.ingest_backpressure.get_or_create(&source).inc();
        return Err(ApiError::unavailable(
            "dead_letter_backpressure",
            format!(
                "{} rejected events of this request cannot be kept now: {pending} are waiting for the store \
                 (dead_letters.max_pending {}); nothing of the request was taken, retry later",
                rejected.len(),
                app.config.dead_letters.max_pending
            ),
            1,
        ));
    }
    let accepted = events.len();
    if let Err(refusal) = app.ingest.accept(events).await {
        return Err(refused(&app, refusal, &source));
    }
    app.metrics.events_received.get_or_create(&source).inc_by((accepted + rejected.len()) as u64);
    app.metrics.events_accepted.get_or_create(&source).inc_by(accepted as u64);
    let response = respond(&app, accepted, &rejected);
    if !rejected.is_empty() {
        for rejection in &rejected {
            count_rejection(&app, rejection.reason);
        }
        let mut letters: Vec<DeadLetter> = rejected.into_iter().map(|r| dead_letter(r, now_ms)).collect();
        if let Some(sampler) = &app.dead_letter_sampler {
            let client = client.map_or_else(|| "an unnamed client".to_string(), |c| c.0.to_string());
            let (kept, dropped) = sampler.sample(&client, letters, now_ms);
            for (reason, count) in dropped {
                app.metrics
                    .dead_letters_sampled
                    .get_or_create(&RejectLabels { source: "http", reason: reason.as_str() })
                    .inc_by(count);
            }
            letters = kept;
        }
        if !letters.is_empty() {
            send_dead_letters(&app, letters);
        }
    }
    Ok((StatusCode::ACCEPTED, Json(response)).into_response())
}

/// The answer to a request whose events were not taken.
fn refused(app: &AppContext, refusal: IngestRefusal, source: &SourceLabels) -> ApiError {
    match refusal {
        IngestRefusal::Backpressure { retry_after, .. } => {
            app.metrics.ingest_backpressure.get_or_create(source).inc();
            ApiError::unavailable(
                "backpressure",
                "the pipeline is behind on checkpoints; retry this request later",
                retry_after.as_secs().max(1),
            )
        }
        IngestRefusal::Closed => ApiError::unavailable("shutting_down", "tidemark is shutting down", 5),
        refusal @ IngestRefusal::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", refusal.to_string())
        }
        IngestRefusal::Unavailable { reason } => {
            tracing::error!(reason = %reason, "accepted events could not be made durable");
            ApiError::unavailable(
                "ingest_log_unavailable",
                format!("tidemark cannot make the events durable ({reason}); retry the request"),
                5,
            )
        }
        IngestRefusal::BrokerUnavailable { acknowledged, total, reason } => {
            // Those the broker has are on the topic: count them as accepted.
            app.metrics.events_accepted.get_or_create(source).inc_by(acknowledged as u64);
            tracing::warn!(acknowledged, total, reason = %reason, "publishing to kafka failed");
            ApiError::unavailable(
                "broker_unavailable",
                format!(
                    "Kafka did not acknowledge the events ({reason}); {acknowledged} of {total} were written before \
                     the failure; retry the request"
                ),
                1,
            )
        }
    }
}

fn respond(app: &AppContext, accepted: usize, rejected: &[Rejection]) -> IngestResponse {
    let listed = app.config.http.max_errors_listed;
    IngestResponse {
        accepted,
        rejected: rejected.len(),
        errors: rejected
            .iter()
            .take(listed)
            .map(|r| IngestError {
                index: r.index,
                field: r.field,
                reason: r.reason.as_str(),
                error: r.message.clone(),
            })
            .collect(),
        errors_truncated: rejected.len() > listed,
    }
}

fn count_rejection(app: &AppContext, reason: RejectReason) {
    app.metrics.events_rejected.get_or_create(&RejectLabels { source: "http", reason: reason.as_str() }).inc();
}

fn dead_letter(rejection: Rejection, now_ms: i64) -> DeadLetter {
    DeadLetter {
        received_at_ms: now_ms,
        source: Source::Http,
        reason: rejection.reason,
        error: format!("event {}: {}", rejection.index, rejection.message),
        sensor_id: rejection.sensor_id,
        event_type: None,
        event_time_ms: rejection.event_time_ms,
        partition: None,
        position: None,
        payload: rejection.raw,
    }
}

fn send_dead_letters(app: &AppContext, letters: Vec<DeadLetter>) {
    let count = letters.len();
    if app.sinks.send_store(StoreMsg::DeadLetters(letters)).is_err() {
        tracing::error!(count, "store sink unavailable: rejected events could not be dead-lettered");
    }
}
