//! The deployment store: PostgreSQL through sqlx, with runtime queries (no database at
//! build time), migrations applied at start-up (under sqlx's advisory lock, so pods
//! starting together do not race), batched upserts in one statement per table, and
//! checkpoints in the same transaction as the results behind them.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use super::{
    AlertQuery, AlertRow, DeadLetterQuery, DeadLetterRow, Page, Prediction, PredictionQuery, ReplayQuery, Store,
    StoreError, TopQuery, TopSensor, TypeSummary, WriteBatch, WriteOutcome, WrittenRow, sql,
};
use crate::config::StoreConfig;
use crate::messages::{KeyStateBlob, PartitionId, RestoredPartition, WindowResult};
use crate::search::{HistogramBucket, HistogramQuery, TextQuery};

/// How result rows reach the table (both measured in `docs/benchmarks.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMethod {
    /// `INSERT … SELECT FROM UNNEST($1::text[], …) ON CONFLICT … DO UPDATE`: one
    /// statement, arrays bound in binary.
    Unnest,
    /// `COPY` into a temporary table, then one `INSERT … SELECT … ON CONFLICT`.
    Copy,
}

pub struct PostgresStore {
    pool: PgPool,
    timeout: Duration,
    method: WriteMethod,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("initial"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/postgres/0001_initial.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("accounting and fencing"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/postgres/0002_accounting_and_fencing.sql")),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("search"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/postgres/0003_search.sql")),
            false,
        ),
        Migration::new(
            4,
            Cow::Borrowed("window kinds"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/postgres/0004_window_kinds.sql")),
            false,
        ),
        Migration::new(
            5,
            Cow::Borrowed("alert rules"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/postgres/0005_alert_rules.sql")),
            false,
        ),
    ])
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn millis(row: &PgRow, column: &str) -> Result<i64, sqlx::Error> {
    Ok(row.try_get::<DateTime<Utc>, _>(column)?.timestamp_millis())
}

/// The shared upsert clause, also setting `search_words` (a PostgreSQL-only column).
/// The rows an upsert's `RETURNING` clause listed.
fn written_rows(rows: &[PgRow]) -> Result<Vec<WrittenRow>, StoreError> {
    let row = |row: &PgRow| -> Result<WrittenRow, sqlx::Error> {
        Ok(WrittenRow {
            id: row.try_get("id")?,
            sensor_id: row.try_get("sensor_id")?,
            event_type: row.try_get("event_type")?,
            window_start_ms: millis(row, "window_start")?,
            created_at_ms: millis(row, "created_at")?,
            updated_at_ms: millis(row, "updated_at")?,
        })
    };
    Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
}

fn upsert_prediction() -> String {
    sql::UPSERT_PREDICTION.replace(
        "updated_at = excluded.updated_at",
        "updated_at = excluded.updated_at, search_words = excluded.search_words",
    )
}

const INSERT_PREDICTIONS: &str = "INSERT INTO predictions (sensor_id, event_type, window_start, window_end, \
     event_count, avg_value, min_value, max_value, stddev, prediction_score, anomaly, severity, revision, \
     explanation, search_words, window_kind, created_at, updated_at) ";

/// The `tsvector` input of a result's searchable words: `'w':1 'w':2 …` (words are
/// letters and digits only, so quoting needs no escapes; PostgreSQL keeps positions up
/// to 16,383).
fn search_words(result: &WindowResult) -> String {
    use std::fmt::Write as _;
    let text = crate::search::searchable_text(
        &result.sensor_id,
        &result.event_type,
        result.severity.as_str(),
        &result.explanation,
    );
    let mut out = String::with_capacity(text.len() + 64);
    for (position, word) in crate::search::words(&text).take(16_383).enumerate() {
        if position > 0 {
            out.push(' ');
        }
        let _ = write!(out, "'{word}':{}", position + 1);
    }
    out
}

/// See [`super::inspect`].
pub(crate) async fn inspect(config: &StoreConfig) -> Result<super::StoreInspection, StoreError> {
    use sqlx::Connection;
    let options = PgConnectOptions::from_str(&config.url)
        .map_err(|error| StoreError::Incompatible(format!("store.url: {error}")))?
        .application_name("tidemark-doctor");
    let mut connection = sqlx::PgConnection::connect_with(&options).await?;
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text").fetch_one(&mut connection).await?;
    let applied: Vec<i64> = if table.is_some() {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut connection)
            .await?
    } else {
        Vec::new()
    };
    let clock: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut connection).await?;
    let _ = connection.close().await;
    Ok(super::StoreInspection {
        applied,
        known: migrator().iter().map(|migration| migration.version).collect(),
        clock_ms: Some(clock.timestamp_millis()),
        missing_database: false,
    })
}

impl PostgresStore {
    pub async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_with(config, WriteMethod::Unnest).await
    }

    pub async fn open_with(config: &StoreConfig, method: WriteMethod) -> Result<Self, StoreError> {
        // TLS follows the URL (`?sslmode=require`, `sslrootcert=…`), as with libpq.
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|error| StoreError::Incompatible(format!("store.url: {error}")))?
            .options([("statement_timeout", config.statement_timeout.as_millis().to_string())])
            .application_name("tidemark");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(config.statement_timeout)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        Ok(Self { pool, timeout: config.statement_timeout, method })
    }

    async fn timed<T>(&self, work: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "statement timed out after {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    async fn upsert_unnest(
        &self,
        tx: &mut sqlx::PgConnection,
        results: &[WindowResult],
    ) -> Result<Vec<WrittenRow>, StoreError> {
        let n = results.len();
        let mut sensor_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(n);
        let mut ends = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(n);
        let mut averages = Vec::with_capacity(n);
        let mut minimums = Vec::with_capacity(n);
        let mut maximums = Vec::with_capacity(n);
        let mut deviations = Vec::with_capacity(n);
        let mut scores = Vec::with_capacity(n);
        let mut anomalies = Vec::with_capacity(n);
        let mut severities = Vec::with_capacity(n);
        let mut revisions = Vec::with_capacity(n);
        let mut explanations = Vec::with_capacity(n);
        let mut words = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for result in results {
            sensor_ids.push(result.sensor_id.as_str());
            event_types.push(result.event_type.as_str());
            starts.push(time(result.window_start_ms));
            ends.push(time(result.window_end_ms));
            counts.push(i64::try_from(result.event_count).unwrap_or(i64::MAX));
            averages.push(result.avg_value);
            minimums.push(result.min_value);
            maximums.push(result.max_value);
            deviations.push(result.stddev);
            scores.push(result.prediction_score);
            anomalies.push(result.anomaly);
            severities.push(result.severity.as_str());
            revisions.push(i32::try_from(result.revision).unwrap_or(i32::MAX));
            explanations.push(result.explanation.as_str());
            words.push(search_words(result));
            kinds.push(result.window_kind.as_str());
        }
        let statement = format!(
            "{INSERT_PREDICTIONS} SELECT s, e, ws, we, c, a, mi, ma, sd, ps, an, sv, r, ex, sw::tsvector, k, now(), \
             now() FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[], \
             $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::bool[], $12::text[], \
             $13::int[], $14::text[], $15::text[], $16::text[]) AS t(s, e, ws, we, c, a, mi, ma, sd, ps, an, sv, r, \
             ex, sw, k){}",
            upsert_prediction()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(sensor_ids)
            .bind(event_types)
            .bind(starts)
            .bind(ends)
            .bind(counts)
            .bind(averages)
            .bind(minimums)
            .bind(maximums)
            .bind(deviations)
            .bind(scores)
            .bind(anomalies)
            .bind(severities)
            .bind(revisions)
            .bind(explanations)
            .bind(words)
            .bind(kinds)
            .fetch_all(&mut *tx)
            .await?;
        written_rows(&rows)
    }

    async fn upsert_copy(
        &self,
        tx: &mut sqlx::PgConnection,
        results: &[WindowResult],
    ) -> Result<Vec<WrittenRow>, StoreError> {
        sqlx::query(
            "CREATE TEMPORARY TABLE IF NOT EXISTS predictions_stage \
             (LIKE predictions INCLUDING DEFAULTS EXCLUDING CONSTRAINTS) ON COMMIT DELETE ROWS",
        )
        .execute(&mut *tx)
        .await?;
        let mut text = String::with_capacity(results.len() * 200);
        for result in results {
            copy_row(&mut text, result);
        }
        let mut copy = tx
            .copy_in_raw(
                "COPY predictions_stage (id, sensor_id, event_type, window_start, window_end, event_count, \
                 avg_value, min_value, max_value, stddev, prediction_score, anomaly, severity, revision, explanation, \
                 search_words, window_kind) FROM STDIN",
            )
            .await?;
        copy.send(text.as_bytes()).await?;
        copy.finish().await?;
        let statement = format!(
            "{INSERT_PREDICTIONS} SELECT sensor_id, event_type, window_start, window_end, event_count, avg_value, \
             min_value, max_value, stddev, prediction_score, anomaly, severity, revision, explanation, search_words, \
             window_kind, now(), now() FROM predictions_stage{}",
            upsert_prediction()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement)).fetch_all(&mut *tx).await?;
        written_rows(&rows)
    }

    async fn write_inner(&self, batch: &WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let mut outcome = WriteOutcome::default();
        let mut tx = self.pool.begin().await?;
        if !batch.results.is_empty() {
            outcome.written = match self.method {
                WriteMethod::Unnest => self.upsert_unnest(&mut tx, batch.results).await?,
                WriteMethod::Copy => self.upsert_copy(&mut tx, batch.results).await?,
            };
            for (sensor_id, event_type, start) in sql::superseded(batch.results) {
                sqlx::query("DELETE FROM predictions WHERE sensor_id = $1 AND event_type = $2 AND window_start = $3")
                    .bind(sensor_id)
                    .bind(event_type)
                    .bind(time(start))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for alert in batch.alerts {
            let row = sqlx::query(sql::UPSERT_ALERT)
                .bind(alert.rule.as_str())
                .bind(alert.kind.as_str())
                .bind(alert.sensor_id.as_str())
                .bind(alert.event_type.as_str())
                .bind(alert.severity.as_str())
                .bind(alert.state.as_str())
                .bind(time(alert.started_at_ms))
                .bind(alert.resolved_at_ms.map(time))
                .bind(alert.message.as_str())
                .bind(alert.value)
                .bind(alert.window_start_ms.map(time))
                .bind(alert.window_end_ms.map(time))
                .bind(Utc::now())
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                outcome.alerts.push(alert_from_row(&row)?);
            }
        }
        if !batch.dead_letters.is_empty() {
            let letters = batch.dead_letters;
            sqlx::query(
                "INSERT INTO dead_letters (received_at, source, reason, error, sensor_id, event_type, event_time, \
                 partition, position, payload) \
                 SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::timestamptz[], $8::int[], $9::bigint[], $10::text[]) \
                 ON CONFLICT (partition, position) WHERE position IS NOT NULL DO NOTHING",
            )
            .bind(letters.iter().map(|l| time(l.received_at_ms)).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.source.as_str()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.error.as_str()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.sensor_id.as_deref()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.event_type.as_deref()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.event_time_ms.map(time)).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.partition.map(|p| p as i32)).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.position.map(|p| i64::try_from(p).unwrap_or(i64::MAX))).collect::<Vec<_>>())
            // PostgreSQL text cannot hold NUL; the payload is for people.
            .bind(letters.iter().map(|l| l.payload.replace('\0', "\u{FFFD}")).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        for checkpoint in batch.checkpoints {
            let partition = checkpoint.partition as i32;
            // The row lock orders this write after any concurrent acquisition.
            let current: Option<i64> =
                sqlx::query_scalar("SELECT epoch FROM partition_owners WHERE partition = $1 FOR UPDATE")
                    .bind(partition)
                    .fetch_optional(&mut *tx)
                    .await?;
            if !super::checkpoint_allowed(checkpoint.owner_epoch, current) {
                outcome.fenced.push((checkpoint.partition, checkpoint.checkpoint_id));
                continue;
            }
            let counters = &checkpoint.counters;
            sqlx::query(
                "INSERT INTO checkpoints (partition, partitions, next_position, clock_ms, checkpoint_id, taken_at, \
                 base_position, events_processed, events_late, dead_lettered, skipped, owner_epoch) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (partition) DO UPDATE SET \
                 partitions = excluded.partitions, next_position = excluded.next_position, \
                 clock_ms = excluded.clock_ms, checkpoint_id = excluded.checkpoint_id, taken_at = excluded.taken_at, \
                 base_position = excluded.base_position, events_processed = excluded.events_processed, \
                 events_late = excluded.events_late, dead_lettered = excluded.dead_lettered, \
                 skipped = excluded.skipped, owner_epoch = excluded.owner_epoch",
            )
            .bind(partition)
            .bind(checkpoint.partitions as i32)
            .bind(sql::int(checkpoint.next_position))
            .bind(checkpoint.clock_ms)
            .bind(sql::int(checkpoint.checkpoint_id))
            .bind(time(checkpoint.taken_at_ms))
            .bind(sql::int(counters.base_position))
            .bind(sql::int(counters.events_processed))
            .bind(sql::int(counters.events_late))
            .bind(sql::int(counters.dead_lettered))
            .bind(sql::int(counters.skipped))
            .bind(sql::int(checkpoint.owner_epoch))
            .execute(&mut *tx)
            .await?;
            if !checkpoint.upserts.is_empty() {
                sqlx::query(
                    "INSERT INTO checkpoint_keys (partition, sensor_id, event_type, state) \
                     SELECT $1, s, e, st FROM UNNEST($2::text[], $3::text[], $4::bytea[]) AS t(s, e, st) \
                     ON CONFLICT (partition, sensor_id, event_type) DO UPDATE SET state = excluded.state",
                )
                .bind(partition)
                .bind(checkpoint.upserts.iter().map(|k| k.sensor_id.as_str()).collect::<Vec<_>>())
                .bind(checkpoint.upserts.iter().map(|k| k.event_type.as_str()).collect::<Vec<_>>())
                .bind(checkpoint.upserts.iter().map(|k| k.state.as_slice()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
            }
            if !checkpoint.deletes.is_empty() {
                sqlx::query(
                    "DELETE FROM checkpoint_keys WHERE partition = $1 AND (sensor_id, event_type) IN \
                     (SELECT * FROM UNNEST($2::text[], $3::text[]))",
                )
                .bind(partition)
                .bind(checkpoint.deletes.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>())
                .bind(checkpoint.deletes.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }
}

/// One row in COPY's text format (tab-separated, backslash escapes).
fn copy_row(out: &mut String, result: &WindowResult) {
    use std::fmt::Write as _;
    fn text(out: &mut String, value: &str) {
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\0' => out.push('\u{FFFD}'),
                c => out.push(c),
            }
        }
    }
    fn float(out: &mut String, value: f64) {
        if value.is_nan() {
            out.push_str("NaN");
        } else if value.is_infinite() {
            out.push_str(if value > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            let _ = write!(out, "{value}");
        }
    }
    out.push_str("0\t");
    text(out, &result.sensor_id);
    out.push('\t');
    text(out, &result.event_type);
    let _ = write!(
        out,
        "\t{}\t{}\t{}\t",
        time(result.window_start_ms).to_rfc3339(),
        time(result.window_end_ms).to_rfc3339(),
        result.event_count
    );
    for value in [result.avg_value, result.min_value, result.max_value, result.stddev, result.prediction_score] {
        float(out, value);
        out.push('\t');
    }
    let _ =
        write!(out, "{}\t{}\t{}\t", if result.anomaly { 't' } else { 'f' }, result.severity.as_str(), result.revision);
    text(out, &result.explanation);
    out.push('\t');
    text(out, &search_words(result));
    out.push('\t');
    out.push_str(result.window_kind.as_str());
    out.push('\n');
}

fn alert_from_row(row: &PgRow) -> Result<AlertRow, sqlx::Error> {
    let optional = |column: &str| -> Result<Option<i64>, sqlx::Error> {
        Ok(row.try_get::<Option<DateTime<Utc>>, _>(column)?.map(|time| time.timestamp_millis()))
    };
    Ok(AlertRow {
        id: row.try_get("id")?,
        rule: row.try_get("rule")?,
        kind: row.try_get("kind")?,
        sensor_id: row.try_get("sensor_id")?,
        event_type: row.try_get("event_type")?,
        severity: row.try_get("severity")?,
        state: row.try_get("state")?,
        started_at: millis(row, "started_at")?,
        resolved_at: optional("resolved_at")?,
        message: row.try_get("message")?,
        value: row.try_get("value")?,
        window_start: optional("window_start")?,
        window_end: optional("window_end")?,
        created_at: millis(row, "created_at")?,
        updated_at: millis(row, "updated_at")?,
    })
}

fn prediction_from_row(row: &PgRow) -> Result<Prediction, sqlx::Error> {
    Ok(Prediction {
        id: row.try_get("id")?,
        sensor_id: row.try_get("sensor_id")?,
        event_type: row.try_get("event_type")?,
        window_start: millis(row, "window_start")?,
        window_end: millis(row, "window_end")?,
        event_count: row.try_get("event_count")?,
        avg_value: row.try_get("avg_value")?,
        min_value: row.try_get("min_value")?,
        max_value: row.try_get("max_value")?,
        stddev: row.try_get("stddev")?,
        prediction_score: row.try_get("prediction_score")?,
        anomaly: row.try_get("anomaly")?,
        severity: row.try_get("severity")?,
        revision: i64::from(row.try_get::<i32, _>("revision")?),
        explanation: row.try_get("explanation")?,
        window_kind: row.try_get("window_kind")?,
        created_at: millis(row, "created_at")?,
        updated_at: millis(row, "updated_at")?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn write(&self, batch: &WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        if batch.is_empty() {
            return Ok(WriteOutcome::default());
        }
        self.timed(self.write_inner(batch)).await
    }

    async fn acquire_partition(&self, partition: PartitionId, owner: &str) -> Result<u64, StoreError> {
        self.timed(async {
            let epoch: i64 = sqlx::query_scalar(
                "INSERT INTO partition_owners (partition, epoch, owner, acquired_at) VALUES ($1, 1, $2, now()) \
                 ON CONFLICT (partition) DO UPDATE SET epoch = partition_owners.epoch + 1, owner = excluded.owner, \
                 acquired_at = excluded.acquired_at RETURNING epoch",
            )
            .bind(partition as i32)
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
            Ok(u64::try_from(epoch).unwrap_or(0))
        })
        .await
    }

    async fn load_checkpoint(
        &self,
        partition: PartitionId,
        partitions: u32,
    ) -> Result<Option<RestoredPartition>, StoreError> {
        self.timed(async {
            let row = sqlx::query(
                "SELECT partitions, next_position, clock_ms, checkpoint_id, base_position, events_processed, \
                 events_late, dead_lettered, skipped FROM checkpoints WHERE partition = $1",
            )
            .bind(partition as i32)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let stored_partitions: i32 = row.try_get("partitions")?;
            if stored_partitions as u32 != partitions {
                return Err(StoreError::Incompatible(format!(
                    "checkpoints in the store were taken with {stored_partitions} partitions but \
                     pipeline.partitions is {partitions}; keep the partition count or start with an empty store"
                )));
            }
            let keys = sqlx::query("SELECT sensor_id, event_type, state FROM checkpoint_keys WHERE partition = $1")
                .bind(partition as i32)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(KeyStateBlob {
                        sensor_id: row.try_get::<&str, _>("sensor_id")?.into(),
                        event_type: row.try_get::<&str, _>("event_type")?.into(),
                        state: row.try_get("state")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(Some(RestoredPartition {
                next_position: u64::try_from(row.try_get::<i64, _>("next_position")?).unwrap_or(0),
                clock_ms: row.try_get("clock_ms")?,
                checkpoint_id: u64::try_from(row.try_get::<i64, _>("checkpoint_id")?).unwrap_or(0),
                counters: sql::counters_from_row(&row)?,
                keys,
            }))
        })
        .await
    }

    async fn predictions(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError> {
        self.timed(async {
            let rows = sql::predictions::<Postgres, _>(query, time, &text_filter).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(prediction_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate(items, query.limit))
        })
        .await
    }

    async fn alerts(&self, query: &AlertQuery) -> Result<Page<AlertRow>, StoreError> {
        self.timed(async {
            let rows = sql::alerts::<Postgres, _>(query, time).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(alert_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate_alerts(items, query.limit))
        })
        .await
    }

    async fn replay(&self, query: &ReplayQuery) -> Result<Page<Prediction>, StoreError> {
        self.timed(async {
            let rows = sql::replay::<Postgres, _>(query, time).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(prediction_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate(items, query.limit))
        })
        .await
    }

    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError> {
        self.timed(async {
            let bucket = |builder: &mut QueryBuilder<Postgres>, interval: i64| {
                builder
                    .push("(FLOOR(EXTRACT(EPOCH FROM window_start) * 1000 / ")
                    .push_bind(interval)
                    .push(")::BIGINT * ")
                    .push_bind(interval)
                    .push(")");
            };
            let rows =
                sql::histogram::<Postgres, _>(query, &bucket, time, &text_filter).build().fetch_all(&self.pool).await?;
            Ok(rows.iter().map(super::bucket_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn top_sensors(&self, query: &TopQuery) -> Result<Vec<TopSensor>, StoreError> {
        self.timed(async {
            let rows = sql::top_sensors::<Postgres, _>(query, time).build().fetch_all(&self.pool).await?;
            Ok(rows.iter().map(super::top_sensor_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn summary(&self, since_ms: i64) -> Result<Vec<TypeSummary>, StoreError> {
        self.timed(async {
            let rows = sql::summary::<Postgres, _>(time(since_ms)).build().fetch_all(&self.pool).await?;
            Ok(rows.iter().map(super::summary_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRow>, StoreError> {
        self.timed(async {
            let rows = sql::dead_letters::<Postgres>(query).build().fetch_all(&self.pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(DeadLetterRow {
                        id: row.try_get("id")?,
                        received_at: millis(row, "received_at")?,
                        source: row.try_get("source")?,
                        reason: row.try_get("reason")?,
                        error: row.try_get("error")?,
                        sensor_id: row.try_get("sensor_id")?,
                        event_type: row.try_get("event_type")?,
                        event_time: row
                            .try_get::<Option<DateTime<Utc>>, _>("event_time")?
                            .map(|t| t.timestamp_millis()),
                        partition: row.try_get::<Option<i32>, _>("partition")?.map(i64::from),
                        position: row.try_get("position")?,
                        payload: row.try_get("payload")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }

    async fn dead_letter_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.timed(async {
            let rows = sqlx::query(sql::DEAD_LETTER_COUNTS).fetch_all(&self.pool).await?;
            rows.iter()
                .map(|row| Ok((row.try_get("reason")?, row.try_get("n")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }

    async fn prune_dead_letters(&self, older_than_ms: i64, keep_rows: u64) -> Result<u64, StoreError> {
        self.timed(async {
            let old = sqlx::query("DELETE FROM dead_letters WHERE received_at < to_timestamp($1::float8 / 1000.0)")
                .bind(older_than_ms as f64)
                .execute(&self.pool)
                .await?
                .rows_affected();
            let over = sqlx::query(
                "DELETE FROM dead_letters WHERE id <= (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET $1)",
            )
            .bind(i64::try_from(keep_rows).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(old + over)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// ` AND` the text query as a `tsquery` over the `search_words` column.
fn text_filter(builder: &mut QueryBuilder<Postgres>, query: &TextQuery) {
    builder.push(" AND search_words @@ to_tsquery('simple', ").push_bind(tsquery(query)).push(")");
}

/// `'w1' <-> 'w2':* & !( 'w3' )`: words are letters and digits only (the parser's
/// words), so quoting them is enough.
fn tsquery(query: &TextQuery) -> String {
    let terms: Vec<String> = query
        .terms
        .iter()
        .map(|term| {
            let last = term.words.len() - 1;
            let phrase: Vec<String> = term
                .words
                .iter()
                .enumerate()
                .map(|(i, word)| if term.prefix && i == last { format!("'{word}':*") } else { format!("'{word}'") })
                .collect();
            let phrase = phrase.join(" <-> ");
            if term.negated { format!("!({phrase})") } else { format!("({phrase})") }
        })
        .collect();
    terms.join(" & ")
}

#[cfg(test)]
mod search_tests {
    use super::*;

    #[test]
    fn the_upsert_keeps_search_words_current() {
        assert!(upsert_prediction().contains("search_words = excluded.search_words"));
    }

    #[test]
    fn search_words_are_a_tsvector_of_the_query_words() {
        let mut result = crate::messages::WindowResult {
            sensor_id: "Sensor-0042".into(),
            event_type: "temperature".into(),
            window_kind: crate::window::WindowKind::Tumbling,
            window_start_ms: 0,
            window_end_ms: 1,
            event_count: 1,
            avg_value: 0.0,
            min_value: 0.0,
            max_value: 0.0,
            stddev: 0.0,
            prediction_score: 0.0,
            anomaly: false,
            severity: crate::messages::Severity::Low,
            revision: 0,
            explanation: "mean 4.2σ above".into(),
            fired_at_ms: 0,
            supersedes: Vec::new(),
        };
        assert_eq!(
            search_words(&result),
            "'sensor':1 '0042':2 'temperature':3 'low':4 'mean':5 '4':6 '2σ':7 'above':8"
        );
        result.explanation = "it's \\ 'quoted'".into();
        let words = search_words(&result);
        assert!(!words.contains('\\') && words.ends_with("'it':5 's':6 'quoted':7"), "{words}");
    }
}
