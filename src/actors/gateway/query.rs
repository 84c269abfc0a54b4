//! Query endpoints: predictions, alerts, top sensors, summary, dead letters.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde::Serialize;
use serde_json::{Value, json};

use super::AppContext;
use super::error::ApiError;
use super::params::{Params, encode_cursor};
use crate::messages::{RejectReason, Severity};
use crate::search::{HistogramQuery, MAX_BUCKETS, TextQuery};
use crate::store::{DeadLetterQuery, Prediction, PredictionQuery, TopBy, TopQuery};

const MAX_ID_LEN: usize = 256;
const MAX_LIMIT: u32 = 1000;
const DEFAULT_LIMIT: u32 = 100;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageBody<T> {
    pub items: Vec<T>,
    pub count: usize,
    pub next_cursor: Option<String>,
}

const PREDICTION_PARAMS: &[&str] = &["sensorId", "eventType", "from", "to", "anomaly", "severity", "limit", "cursor"];

/// `GET /api/predictions` — newest windows first, with filters and cursor pagination.
pub async fn predictions(
    State(app): State<Arc<AppContext>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PageBody<Prediction>>, ApiError> {
    let query = predictions_query(raw.as_deref())?;
    page(&app, &query).await
}

/// The query of `GET /api/predictions` from its raw query string.
pub fn predictions_query(raw: Option<&str>) -> Result<PredictionQuery, ApiError> {
    let mut params = Params::parse(raw)?;
    let mut query = prediction_query(&mut params)?;
    query.anomaly = params.boolean(&["anomaly"])?;
    params.finish(PREDICTION_PARAMS)?;
    Ok(query)
}

/// `GET /api/alerts` — the alert rules' alerts, newest first (by the time they
/// started), firing or resolved, with the rule that raised them.
pub async fn alerts(
    State(app): State<Arc<AppContext>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PageBody<crate::store::AlertRow>>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let filters = prediction_filters(&mut params)?;
    let state =
        match params.take(&["state"])? {
            None => None,
            Some(text) => Some(crate::rules::AlertState::parse(&text).ok_or_else(|| {
                ApiError::parameter("state", format!("unknown state {text:?}; use firing or resolved"))
            })?),
        };
    let rules = params.string(&["rule"], MAX_ID_LEN)?.into_iter().collect();
    let query = crate::store::AlertQuery {
        sensor_ids: filters.sensor_id.into_iter().collect(),
        event_types: filters.event_type.into_iter().collect(),
        rules,
        state,
        severities: filters.severities,
        from_ms: filters.from_ms,
        to_ms: filters.to_ms,
        cursor: params.cursor()?,
        after_id: None,
        limit: params.number(&["limit"], 1, MAX_LIMIT, DEFAULT_LIMIT)?,
    };
    params.finish(&["sensorId", "eventType", "rule", "state", "from", "to", "severity", "limit", "cursor"])?;
    let page = app.store.alerts(&query).await?;
    Ok(Json(PageBody { count: page.items.len(), items: page.items, next_cursor: page.next.map(encode_cursor) }))
}

/// `GET /api/rules` — the alert rules in force (a reload changes them), as configured.
pub async fn rules(State(app): State<Arc<AppContext>>) -> Json<serde_json::Value> {
    let rules = app.rules.current();
    let items: Vec<serde_json::Value> = rules
        .iter()
        .map(|rule| {
            let mut value = serde_json::to_value(&rule.config).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("name".into(), rule.name.as_str().into());
            }
            value
        })
        .collect();
    Json(serde_json::json!({"count": items.len(), "items": items}))
}

fn prediction_query(params: &mut Params) -> Result<PredictionQuery, ApiError> {
    let mut query = prediction_filters(params)?;
    query.limit = params.number(&["limit"], 1, MAX_LIMIT, DEFAULT_LIMIT)?;
    query.cursor = params.cursor()?;
    Ok(query)
}

/// The filters of a prediction query, without its page (limit, cursor).
fn prediction_filters(params: &mut Params) -> Result<PredictionQuery, ApiError> {
    let severities = match params.take(&["severity"])? {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|name| {
                Severity::parse(name.trim()).ok_or_else(|| {
                    ApiError::parameter(
                        "severity",
                        format!("unknown severity {name:?}; use LOW, MEDIUM, HIGH or CRITICAL"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let query = PredictionQuery {
        sensor_id: params.string(&["sensorId", "sensor_id"], MAX_ID_LEN)?,
        event_type: params.string(&["eventType", "event_type"], MAX_ID_LEN)?,
        from_ms: params.time(&["from"])?,
        to_ms: params.time(&["to"])?,
        anomaly: None,
        severities,
        limit: DEFAULT_LIMIT,
        cursor: None,
        text: None,
    };
    // `from` after `to` is an empty range: an empty page, like SQL's reversed BETWEEN.
    Ok(query)
}

async fn page(app: &AppContext, query: &PredictionQuery) -> Result<Json<PageBody<Prediction>>, ApiError> {
    let page = app.store.predictions(query).await?;
    Ok(Json(PageBody { count: page.items.len(), items: page.items, next_cursor: page.next.map(encode_cursor) }))
}

const SEARCH_PARAMS: &[&str] = &["q", "sensorId", "eventType", "from", "to", "anomaly", "severity", "limit", "cursor"];

fn search_query(params: &mut Params) -> Result<PredictionQuery, ApiError> {
    let mut query = prediction_query(params)?;
    search_text(params, &mut query)?;
    Ok(query)
}

/// `anomaly` and `q`, the filters `/api/search` adds to those of `/api/alerts`.
fn search_text(params: &mut Params, query: &mut PredictionQuery) -> Result<(), ApiError> {
    query.anomaly = params.boolean(&["anomaly"])?;
    let q = params.take(&["q"])?.unwrap_or_default();
    query.text = TextQuery::parse(&q).map_err(|error| ApiError::parameter("q", error))?;
    Ok(())
}

/// `GET /api/search?q=&sensorId=&…` — window results whose sensor id, event type,
/// severity or explanation match `q` (words, "phrases", `-excluded`, `prefix*`), newest
/// first, with the filters and cursors of `/api/predictions`. Answered by Elasticsearch
/// when it is configured, by the store otherwise.
pub async fn search(
    State(app): State<Arc<AppContext>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<PageBody<Prediction>>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let query = search_query(&mut params)?;
    params.finish(SEARCH_PARAMS)?;
    let page = app.search.search(&query).await?;
    Ok(Json(PageBody { count: page.items.len(), items: page.items, next_cursor: page.next.map(encode_cursor) }))
}

/// `GET /api/search/histogram?interval=1m&q=&…` — windows and anomalies per interval
/// (of window start) and event type, for charts; the filters of `/api/search`.
pub async fn histogram(State(app): State<Arc<AppContext>>, RawQuery(raw): RawQuery) -> Result<Json<Value>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let interval_text = params.take(&["interval"])?.unwrap_or_else(|| "1m".to_string());
    let interval = humantime::parse_duration(&interval_text)
        .ok()
        .and_then(|interval| i64::try_from(interval.as_millis()).ok())
        .filter(|ms| (1000..=366 * 86_400_000).contains(ms))
        .ok_or_else(|| {
            ApiError::parameter(
                "interval",
                format!("expected a duration from 1s to 366d such as 1m or 1h, got {interval_text:?}"),
            )
        })?;
    let mut query = prediction_filters(&mut params)?;
    search_text(&mut params, &mut query)?;
    let mut allowed = vec!["interval"];
    allowed.extend(SEARCH_PARAMS.iter().filter(|name| !matches!(**name, "limit" | "cursor")));
    params.finish(&allowed)?;
    let histogram = HistogramQuery { query, interval_ms: interval };
    let mut buckets = app.search.histogram(&histogram).await?;
    if buckets.len() > MAX_BUCKETS {
        return Err(ApiError::parameter(
            "interval",
            format!("more than {MAX_BUCKETS} buckets; widen the interval or narrow from/to"),
        ));
    }
    buckets.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| a.event_type.cmp(&b.event_type)));
    Ok(Json(json!({
        "interval": interval_text,
        "intervalMs": interval,
        "backend": app.search.name(),
        "buckets": buckets,
    })))
}

fn minutes(params: &mut Params) -> Result<u32, ApiError> {
    params.number(&["minutes"], 1, 60 * 24 * 366, 10)
}

fn since(minutes: u32) -> i64 {
    chrono::Utc::now().timestamp_millis() - i64::from(minutes) * 60_000
}

/// `GET /api/sensors/top?minutes=10&by=avgValue&n=5` — the sensors with the highest
/// measure over the windows that ended in the last `minutes`.
pub async fn top_sensors(State(app): State<Arc<AppContext>>, RawQuery(raw): RawQuery) -> Result<Json<Value>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let minutes = minutes(&mut params)?;
    let by_name = params.take(&["by"])?.unwrap_or_else(|| "avgValue".to_string());
    let by = TopBy::parse(&by_name).ok_or_else(|| {
        ApiError::parameter("by", format!("expected one of {}, got {by_name:?}", TopBy::NAMES.join(", ")))
    })?;
    let n = params.number(&["n", "limit"], 1, 100, 5)?;
    let event_type = params.string(&["eventType", "event_type"], MAX_ID_LEN)?;
    params.finish(&["minutes", "by", "n", "eventType"])?;
    let items = app.store.top_sensors(&TopQuery { since_ms: since(minutes), by, n, event_type }).await?;
    Ok(Json(json!({"minutes": minutes, "by": by_name, "items": items})))
}

/// `GET /api/summary?minutes=10` — per event type: windows, events, average, anomalies.
pub async fn summary(State(app): State<Arc<AppContext>>, RawQuery(raw): RawQuery) -> Result<Json<Value>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let minutes = minutes(&mut params)?;
    params.finish(&["minutes"])?;
    let since_ms = since(minutes);
    let event_types = app.store.summary(since_ms).await?;
    Ok(Json(json!({
        "minutes": minutes,
        "since": crate::store::ser::rfc3339(since_ms),
        "eventTypes": event_types,
    })))
}

/// `GET /api/dead-letters?reason=&sensorId=&limit=&cursor=` — rejected, late and poison
/// events, newest first.
pub async fn dead_letters(
    State(app): State<Arc<AppContext>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let reason = match params.take(&["reason"])? {
        None => None,
        Some(name) => Some(RejectReason::parse(&name).ok_or_else(|| {
            let names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::parameter("reason", format!("expected one of {}, got {name:?}", names.join(", ")))
        })?),
    };
    let sensor_id = params.string(&["sensorId", "sensor_id"], MAX_ID_LEN)?;
    let limit = params.number(&["limit"], 1, MAX_LIMIT, DEFAULT_LIMIT)?;
    let before_id = match params.take(&["cursor"])? {
        None => None,
        Some(cursor) => Some(
            cursor.parse::<i64>().map_err(|_| ApiError::parameter("cursor", "not a cursor returned by this API"))?,
        ),
    };
    params.finish(&["reason", "sensorId", "limit", "cursor"])?;
    let items = app.store.dead_letters(&DeadLetterQuery { reason, sensor_id, limit, before_id }).await?;
    let counts: BTreeMap<String, i64> = app.store.dead_letter_counts().await?.into_iter().collect();
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|row| row.id.to_string())).flatten();
    Ok(Json(json!({
        "count": items.len(),
        "items": items,
        "nextCursor": next_cursor,
        "totalsByReason": counts,
    })))
}

/// Clock-skew rejections read for `/api/sensors/skew`: the newest this many.
const SKEW_SAMPLE: usize = 10_000;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SkewedSensor {
    sensor_id: String,
    rejected: usize,
    /// Median of event time − receive time over the rejected events, in milliseconds.
    median_offset_ms: i64,
    median_offset: String,
    #[serde(serialize_with = "crate::store::ser::millis_rfc3339")]
    last_rejected_at: i64,
}

/// `GET /api/sensors/skew?limit=` — sensors whose clocks run ahead: events rejected as
/// `clock_skew` (stamped further ahead than `pipeline.max_future_skew`), per sensor,
/// with the median offset of their clocks, most rejections first. Read from the newest
/// 10,000 such dead letters.
pub async fn skewed_sensors(
    State(app): State<Arc<AppContext>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut params = Params::parse(raw.as_deref())?;
    let limit = params.number(&["limit"], 1, MAX_LIMIT, DEFAULT_LIMIT)? as usize;
    params.finish(&["limit"])?;
    let mut offsets: BTreeMap<String, (Vec<i64>, i64)> = BTreeMap::new();
    let mut before_id = None;
    let mut read = 0;
    while read < SKEW_SAMPLE {
        let rows = app
            .store
            .dead_letters(&DeadLetterQuery {
                reason: Some(RejectReason::ClockSkew),
                sensor_id: None,
                limit: MAX_LIMIT,
                before_id,
            })
            .await?;
        read += rows.len();
        for row in &rows {
            if let (Some(sensor), Some(event_time)) = (&row.sensor_id, row.event_time) {
                let entry = offsets.entry(sensor.clone()).or_default();
                entry.0.push(event_time - row.received_at);
                entry.1 = entry.1.max(row.received_at);
            }
        }
        match rows.last() {
            Some(last) if rows.len() == MAX_LIMIT as usize => before_id = Some(last.id),
            _ => break,
        }
    }
    let mut sensors: Vec<SkewedSensor> = offsets
        .into_iter()
        .map(|(sensor_id, (mut offsets, last))| {
            offsets.sort_unstable();
            let median = offsets[offsets.len() / 2];
            SkewedSensor {
                sensor_id,
                rejected: offsets.len(),
                median_offset_ms: median,
                median_offset: humantime::format_duration(std::time::Duration::from_secs(
                    u64::try_from(median / 1000).unwrap_or(0),
                ))
                .to_string(),
                last_rejected_at: last,
            }
        })
        .collect();
    sensors.sort_by(|a, b| b.rejected.cmp(&a.rejected).then_with(|| a.sensor_id.cmp(&b.sensor_id)));
    sensors.truncate(limit);
    Ok(Json(json!({
        "count": sensors.len(),
        "items": sensors,
        "maxFutureSkew": humantime::format_duration(app.config.pipeline.max_future_skew).to_string(),
        "sampledRejections": read,
    })))
}
