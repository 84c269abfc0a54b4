//! The query side's SQL, written once for both backends. The SQL is portable (casts both
//! dialects accept); a backend supplies how an instant is bound (epoch milliseconds in
//! SQLite, `TIMESTAMPTZ` in PostgreSQL) and decodes the rows.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{AlertQuery, DeadLetterQuery, PredictionQuery, ReplayQuery, Since, TopBy, TopQuery};
use crate::search::{HistogramQuery, TextQuery};

pub const PREDICTION_COLUMNS: &str = "id, sensor_id, event_type, window_start, window_end, event_count, \
     avg_value, min_value, max_value, stddev, prediction_score, anomaly, severity, revision, explanation, \
     window_kind, created_at, updated_at";

pub const DEAD_LETTER_COLUMNS: &str =
    "id, received_at, source, reason, error, sensor_id, event_type, event_time, partition, position, payload";

/// How a backend adds a free-text condition (` AND …`) to a query.
pub type TextFilter<'a, DB> = &'a dyn Fn(&mut QueryBuilder<DB>, &TextQuery);

/// `SELECT … FROM predictions` with the query's filters, newest first, one row more
/// than the limit (to know whether there is a next page).
pub fn predictions<DB, T>(
    query: &PredictionQuery,
    time: impl Fn(i64) -> T,
    text: TextFilter<'_, DB>,
) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    bool: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new(format!("SELECT {PREDICTION_COLUMNS} FROM predictions WHERE 1 = 1"));
    filters(&mut builder, query, &time, text);
    if let Some(cursor) = query.cursor {
        keyset(&mut builder, cursor, "<", &time);
    }
    builder.push(" ORDER BY window_start DESC, id DESC LIMIT ").push_bind(i64::from(query.limit) + 1);
    builder
}

/// `SELECT … FROM predictions` after a replay's starting point, oldest first, one row
/// more than the limit.
pub fn replay<DB, T>(query: &ReplayQuery, time: impl Fn(i64) -> T) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    bool: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new(format!("SELECT {PREDICTION_COLUMNS} FROM predictions WHERE 1 = 1"));
    any_of(&mut builder, "sensor_id", query.sensor_ids.iter().map(String::as_str));
    any_of(&mut builder, "event_type", query.event_types.iter().map(String::as_str));
    if let Some(anomaly) = query.anomaly {
        builder.push(" AND anomaly = ").push_bind(anomaly);
    }
    any_of(&mut builder, "severity", query.severities.iter().map(|severity| severity.as_str()));
    match query.since {
        Since::WindowStart(ms) => builder.push(" AND window_start >= ").push_bind(time(ms)),
        Since::AfterId(id) => builder.push(" AND id > ").push_bind(id),
    };
    if let Some(cursor) = query.after {
        keyset(&mut builder, cursor, ">", &time);
    }
    builder.push(" ORDER BY window_start ASC, id ASC LIMIT ").push_bind(i64::from(query.limit) + 1);
    builder
}

pub const ALERT_COLUMNS: &str = "id, rule, kind, sensor_id, event_type, severity, state, started_at, resolved_at, \
     message, value, window_start, window_end, created_at, updated_at";

/// One alert transition: inserted when it fires; a `resolved` one resolves the stored
/// alert. A transition the store has already (a replay after a restart) changes
/// nothing and returns no row. `$n` placeholders, in the order of the columns.
pub const UPSERT_ALERT: &str = "INSERT INTO alerts (rule, kind, sensor_id, event_type, severity, state, \
     started_at, resolved_at, message, value, window_start, window_end, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) \
     ON CONFLICT (rule, sensor_id, event_type, started_at) DO UPDATE SET \
     state = excluded.state, resolved_at = excluded.resolved_at, updated_at = excluded.updated_at \
     WHERE excluded.state = 'resolved' AND alerts.state = 'firing' \
     RETURNING id, rule, kind, sensor_id, event_type, severity, state, started_at, resolved_at, message, value, \
     window_start, window_end, created_at, updated_at"; // = ALERT_COLUMNS (a const cannot be spliced in)

/// `SELECT … FROM alerts` with the query's filters: newest first (by start), or oldest
/// first by id when `after_id` is set; one row more than the limit.
pub fn alerts<DB, T>(query: &AlertQuery, time: impl Fn(i64) -> T) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1"));
    any_of(&mut builder, "sensor_id", query.sensor_ids.iter().map(String::as_str));
    any_of(&mut builder, "event_type", query.event_types.iter().map(String::as_str));
    any_of(&mut builder, "rule", query.rules.iter().map(String::as_str));
    any_of(&mut builder, "severity", query.severities.iter().map(|severity| severity.as_str()));
    if let Some(state) = query.state {
        builder.push(" AND state = ").push_bind(state.as_str());
    }
    if let Some(from) = query.from_ms {
        builder.push(" AND started_at >= ").push_bind(time(from));
    }
    if let Some(to) = query.to_ms {
        builder.push(" AND started_at < ").push_bind(time(to));
    }
    match query.after_id {
        Some(id) => {
            builder.push(" AND id > ").push_bind(id).push(" ORDER BY id ASC");
        }
        None => {
            if let Some(cursor) = query.cursor {
                builder
                    .push(" AND (started_at < ")
                    .push_bind(time(cursor.window_start_ms))
                    .push(" OR (started_at = ")
                    .push_bind(time(cursor.window_start_ms))
                    .push(" AND id < ")
                    .push_bind(cursor.id)
                    .push("))");
            }
            builder.push(" ORDER BY started_at DESC, id DESC");
        }
    }
    builder.push(" LIMIT ").push_bind(i64::from(query.limit) + 1);
    builder
}

/// ` AND column IN (…)` over `values`; nothing when there are none.
fn any_of<'v, DB>(builder: &mut QueryBuilder<DB>, column: &str, values: impl Iterator<Item = &'v str>)
where
    DB: Database,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    let mut values = values.peekable();
    if values.peek().is_none() {
        return;
    }
    builder.push(format_args!(" AND {column} IN ("));
    let mut separated = builder.separated(", ");
    for value in values {
        separated.push_bind(value);
    }
    builder.push(")");
}

/// The keyset condition past `cursor` (`after` is `<` newest first, `>` oldest first).
fn keyset<DB, T>(builder: &mut QueryBuilder<DB>, cursor: super::Cursor, after: &str, time: &impl Fn(i64) -> T)
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
{
    builder
        .push(format_args!(" AND (window_start {after} "))
        .push_bind(time(cursor.window_start_ms))
        .push(" OR (window_start = ")
        .push_bind(time(cursor.window_start_ms))
        .push(format_args!(" AND id {after} "))
        .push_bind(cursor.id)
        .push("))");
}

/// Windows and anomalies per bucket (`bucket` pushes a backend's expression of the
/// bucket start in epoch milliseconds for an interval) and event type.
pub fn histogram<DB, T>(
    query: &HistogramQuery,
    bucket: &dyn Fn(&mut QueryBuilder<DB>, i64),
    time: impl Fn(i64) -> T,
    text: TextFilter<'_, DB>,
) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    bool: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new("SELECT ");
    bucket(&mut builder, query.interval_ms);
    builder.push(
        " AS bucket, event_type, COUNT(*) AS windows, \
         SUM(CASE WHEN anomaly THEN 1 ELSE 0 END) AS anomalies FROM predictions WHERE 1 = 1",
    );
    filters(&mut builder, &query.query, &time, text);
    builder.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ").push_bind(crate::search::MAX_BUCKETS as i64 + 1);
    builder
}

fn filters<DB, T>(
    builder: &mut QueryBuilder<DB>,
    query: &PredictionQuery,
    time: &impl Fn(i64) -> T,
    text: TextFilter<'_, DB>,
) where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    bool: for<'t> Encode<'t, DB> + Type<DB>,
{
    if let Some(sensor_id) = &query.sensor_id {
        builder.push(" AND sensor_id = ").push_bind(sensor_id.as_str());
    }
    if let Some(event_type) = &query.event_type {
        builder.push(" AND event_type = ").push_bind(event_type.as_str());
    }
    if let Some(from_ms) = query.from_ms {
        builder.push(" AND window_start >= ").push_bind(time(from_ms));
    }
    if let Some(to_ms) = query.to_ms {
        builder.push(" AND window_start < ").push_bind(time(to_ms));
    }
    if let Some(anomaly) = query.anomaly {
        builder.push(" AND anomaly = ").push_bind(anomaly);
    }
    any_of(builder, "severity", query.severities.iter().map(|severity| severity.as_str()));
    if let Some(query) = &query.text {
        text(builder, query);
    }
}

fn top_measure(by: TopBy) -> &'static str {
    match by {
        TopBy::AvgValue => "SUM(avg_value * event_count) / SUM(event_count)",
        TopBy::MaxValue => "MAX(max_value)",
        TopBy::EventCount => "CAST(SUM(event_count) AS DOUBLE PRECISION)",
        TopBy::PredictionScore => "MAX(prediction_score)",
    }
}

/// Per `(sensor_id, event_type)` over the windows started since `since_ms`, ranked.
pub fn top_sensors<DB, T>(query: &TopQuery, time: impl Fn(i64) -> T) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
{
    let measure = top_measure(query.by);
    let mut builder = QueryBuilder::new(format!(
        "SELECT sensor_id, event_type, {measure} AS measure, COUNT(*) AS windows, \
         CAST(SUM(event_count) AS BIGINT) AS events, \
         SUM(avg_value * event_count) / SUM(event_count) AS avg_value, \
         MAX(max_value) AS max_value, MAX(prediction_score) AS max_score \
         FROM predictions WHERE window_start >= "
    ));
    builder.push_bind(time(query.since_ms));
    if let Some(event_type) = &query.event_type {
        builder.push(" AND event_type = ").push_bind(event_type.as_str());
    }
    builder
        .push(" GROUP BY sensor_id, event_type ORDER BY measure DESC, sensor_id, event_type LIMIT ")
        .push_bind(i64::from(query.n));
    builder
}

/// Per event type over the windows started since `since_ms`.
pub fn summary<DB, T>(since: T) -> QueryBuilder<DB>
where
    DB: Database,
    T: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new(
        "SELECT event_type, COUNT(*) AS windows, CAST(SUM(event_count) AS BIGINT) AS events, \
         COUNT(DISTINCT sensor_id) AS sensors, SUM(avg_value * event_count) / SUM(event_count) AS avg_value, \
         MIN(min_value) AS min_value, MAX(max_value) AS max_value, \
         CAST(SUM(CASE WHEN anomaly THEN 1 ELSE 0 END) AS BIGINT) AS anomalies \
         FROM predictions WHERE window_start >= ",
    );
    builder.push_bind(since).push(" GROUP BY event_type ORDER BY event_type");
    builder
}

pub fn dead_letters<DB>(query: &DeadLetterQuery) -> QueryBuilder<DB>
where
    DB: Database,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut builder = QueryBuilder::new(format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE 1 = 1"));
    if let Some(reason) = query.reason {
        builder.push(" AND reason = ").push_bind(reason.as_str());
    }
    if let Some(sensor_id) = &query.sensor_id {
        builder.push(" AND sensor_id = ").push_bind(sensor_id.as_str());
    }
    if let Some(before_id) = query.before_id {
        builder.push(" AND id < ").push_bind(before_id);
    }
    builder.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
    builder
}

pub const DEAD_LETTER_COUNTS: &str = "SELECT reason, COUNT(*) AS n FROM dead_letters GROUP BY reason ORDER BY reason";

/// The upsert's conflict clause: an older revision never overwrites a newer one; a
/// replay after a restart re-emits identical values, which change nothing (so the row is
/// not returned, and the live feed does not send it twice); the same revision with other
/// values (reprocessing with another model) replaces it.
pub const UPSERT_PREDICTION: &str = " ON CONFLICT (sensor_id, event_type, window_start) DO UPDATE SET \
     window_end = excluded.window_end, event_count = excluded.event_count, \
     avg_value = excluded.avg_value, min_value = excluded.min_value, max_value = excluded.max_value, \
     stddev = excluded.stddev, prediction_score = excluded.prediction_score, anomaly = excluded.anomaly, \
     severity = excluded.severity, revision = excluded.revision, explanation = excluded.explanation, \
     window_kind = excluded.window_kind, updated_at = excluded.updated_at \
     WHERE excluded.revision > predictions.revision \
     OR (excluded.revision = predictions.revision AND (excluded.window_end, excluded.event_count, \
     excluded.avg_value, excluded.min_value, excluded.max_value, excluded.stddev, excluded.prediction_score, \
     excluded.anomaly, excluded.severity, excluded.explanation, excluded.window_kind) <> (predictions.window_end, \
     predictions.event_count, predictions.avg_value, predictions.min_value, predictions.max_value, \
     predictions.stddev, predictions.prediction_score, predictions.anomaly, predictions.severity, \
     predictions.explanation, predictions.window_kind)) \
     RETURNING id, sensor_id, event_type, window_start, created_at, updated_at";

/// Rows that session results replace (`WindowResult::supersedes`): `(sensor_id,
/// event_type, window_start)` to delete, in the order the results came.
pub fn superseded(results: &[crate::messages::WindowResult]) -> impl Iterator<Item = (&str, &str, i64)> {
    results.iter().flat_map(|result| {
        result.supersedes.iter().map(|start| (result.sensor_id.as_str(), result.event_type.as_str(), *start))
    })
}

/// A count or position as the `BIGINT` the stores keep it in.
pub fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The accounting columns of a `checkpoints` row.
pub fn counters_from_row<R: sqlx::Row>(row: &R) -> Result<crate::messages::PartitionCounters, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let count =
        |column: &str| -> Result<u64, sqlx::Error> { Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0)) };
    Ok(crate::messages::PartitionCounters {
        base_position: count("base_position")?,
        events_processed: count("events_processed")?,
        events_late: count("events_late")?,
        dead_lettered: count("dead_lettered")?,
        skipped: count("skipped")?,
    })
}
