//! The embedded store: SQLite in WAL mode through sqlx, created and migrated on first use.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{
    AlertQuery, AlertRow, DeadLetterQuery, DeadLetterRow, Page, Prediction, PredictionQuery, ReplayQuery, Store,
    StoreError, TopQuery, TopSensor, TypeSummary, WriteBatch, WriteOutcome, WrittenRow, sql,
};
use crate::config::{StoreConfig, sqlite_path};
use crate::messages::{KeyStateBlob, PartitionId, RestoredPartition};
use crate::search::{HistogramBucket, HistogramQuery, Term, TextQuery};

/// Rows per multi-row statement: 17 parameters each stays far below SQLite's limit.
const ROWS_PER_STATEMENT: usize = 500;

/// [`sql::UPSERT_ALERT`] with SQLite's `?n` placeholders, built once.
static UPSERT_ALERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| sql::UPSERT_ALERT.replace('$', "?"));

pub struct SqliteStore {
    /// Queries (and the background WAL checkpoints).
    pool: SqlitePool,
    /// Writes: SQLite has one writer at a time, and a connection's page cache is
    /// invalidated whenever another connection wrote, so all writes share one
    /// connection whose cache stays warm.
    writer: SqlitePool,
    timeout: Duration,
    checkpointer: tokio::task::JoinHandle<()>,
}

/// How often the WAL is copied back into the database file.
const WAL_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Copy the WAL into the database every second with a PASSIVE checkpoint, which never
/// blocks the writer (pages still being read are left for the next round), so the WAL
/// stays small without any commit paying for it. PASSIVE never shrinks the file, and
/// steady readers can keep SQLite from ever restarting the WAL at its beginning: once
/// it holds more than `max_bytes`, a TRUNCATE checkpoint waits for the readers (the
/// busy timeout), copies everything and truncates the file to zero.
fn spawn_checkpointer(
    pool: SqlitePool,
    wal_path: Option<std::path::PathBuf>,
    max_bytes: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(WAL_CHECKPOINT_EVERY);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::debug!(error = %error, "wal checkpoint skipped");
            }
            let size = wal_path.as_ref().and_then(|path| std::fs::metadata(path).ok()).map_or(0, |m| m.len());
            if size > max_bytes {
                match sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await {
                    Ok(_) => tracing::debug!(wal_bytes = size, "wal truncated"),
                    Err(error) => tracing::warn!(error = %error, wal_bytes = size, "wal could not be truncated"),
                }
            }
        }
    })
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("initial"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/sqlite/0001_initial.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("accounting and fencing"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/sqlite/0002_accounting_and_fencing.sql")),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("search"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/sqlite/0003_search.sql")),
            false,
        ),
        Migration::new(
            4,
            Cow::Borrowed("window kinds"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/sqlite/0004_window_kinds.sql")),
            false,
        ),
        Migration::new(
            5,
            Cow::Borrowed("alert rules"),
            MigrationType::Simple,
            sqlx::SqlStr::from_static(include_str!("../../migrations/sqlite/0005_alert_rules.sql")),
            false,
        ),
    ])
}

/// See [`super::inspect`].
pub(crate) async fn inspect(config: &StoreConfig) -> Result<super::StoreInspection, StoreError> {
    use sqlx::Connection;
    let known = migrator().iter().map(|migration| migration.version).collect();
    if sqlite_path(&config.url).is_some_and(|path| !path.exists()) {
        return Ok(super::StoreInspection { known, missing_database: true, ..Default::default() });
    }
    let options = SqliteConnectOptions::from_str(&config.url)
        .map_err(|error| StoreError::Incompatible(format!("store.url: {error}")))?
        .read_only(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
    let table: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
            .fetch_optional(&mut connection)
            .await?;
    let applied: Vec<i64> = if table.is_some() {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut connection)
            .await?
    } else {
        Vec::new()
    };
    let _ = connection.close().await;
    Ok(super::StoreInspection { applied, known, clock_ms: None, missing_database: false })
}

impl SqliteStore {
    pub async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        if let Some(path) = sqlite_path(&config.url)
            && let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|error| StoreError::Unavailable(format!("cannot create {}: {error}", parent.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&config.url)
            .map_err(|error| StoreError::Incompatible(format!("store.url: {error}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(config.statement_timeout)
            .foreign_keys(true)
            // Index maintenance of upserts reads pages all over the B-trees: keep them in
            // a 64 MiB cache and read the file through mmap instead of pread copies.
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "268435456")
            .pragma("temp_store", "memory")
            // Commits never checkpoint the WAL themselves (that stalled the write path,
            // the fire -> ack p99); a background task does it, see `spawn_checkpointer`.
            .pragma("wal_autocheckpoint", "0");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.statement_timeout)
            .connect_with(options.clone())
            .await?;
        migrator().run(&writer).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(config.statement_timeout)
            .connect_with(options)
            .await?;
        let wal_path = sqlite_path(&config.url).map(|db| {
            let mut name = db.as_os_str().to_os_string();
            name.push("-wal");
            std::path::PathBuf::from(name)
        });
        let checkpointer = spawn_checkpointer(pool.clone(), wal_path, config.sqlite_wal_max_bytes);
        Ok(Self { pool, writer, timeout: config.statement_timeout, checkpointer })
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

    async fn write_inner(&self, batch: &WriteBatch<'_>) -> Result<WriteOutcome, StoreError> {
        let mut outcome = WriteOutcome::default();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut tx = self.writer.begin().await?;
        for chunk in batch.results.chunks(ROWS_PER_STATEMENT) {
            let mut builder: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO predictions (sensor_id, event_type, window_start, window_end, event_count, avg_value, \
                 min_value, max_value, stddev, prediction_score, anomaly, severity, revision, explanation, \
                 window_kind, created_at, updated_at) ",
            );
            builder.push_values(chunk, |mut row, result| {
                row.push_bind(result.sensor_id.as_str())
                    .push_bind(result.event_type.as_str())
                    .push_bind(result.window_start_ms)
                    .push_bind(result.window_end_ms)
                    .push_bind(i64::try_from(result.event_count).unwrap_or(i64::MAX))
                    .push_bind(result.avg_value)
                    .push_bind(result.min_value)
                    .push_bind(result.max_value)
                    .push_bind(result.stddev)
                    .push_bind(result.prediction_score)
                    .push_bind(result.anomaly)
                    .push_bind(result.severity.as_str())
                    .push_bind(i64::from(result.revision))
                    .push_bind(result.explanation.as_str())
                    .push_bind(result.window_kind.as_str())
                    .push_bind(now_ms)
                    .push_bind(now_ms);
            });
            builder.push(sql::UPSERT_PREDICTION);
            for row in builder.build().fetch_all(&mut *tx).await? {
                outcome.written.push(WrittenRow {
                    id: row.try_get("id")?,
                    sensor_id: row.try_get("sensor_id")?,
                    event_type: row.try_get("event_type")?,
                    window_start_ms: row.try_get("window_start")?,
                    created_at_ms: row.try_get("created_at")?,
                    updated_at_ms: row.try_get("updated_at")?,
                });
            }
        }
        for (sensor_id, event_type, start) in sql::superseded(batch.results) {
            sqlx::query("DELETE FROM predictions WHERE sensor_id = ? AND event_type = ? AND window_start = ?")
                .bind(sensor_id)
                .bind(event_type)
                .bind(start)
                .execute(&mut *tx)
                .await?;
        }
        for alert in batch.alerts {
            let row = sqlx::query(sqlx::AssertSqlSafe(UPSERT_ALERT.as_str()))
                .bind(alert.rule.as_str())
                .bind(alert.kind.as_str())
                .bind(alert.sensor_id.as_str())
                .bind(alert.event_type.as_str())
                .bind(alert.severity.as_str())
                .bind(alert.state.as_str())
                .bind(alert.started_at_ms)
                .bind(alert.resolved_at_ms)
                .bind(alert.message.as_str())
                .bind(alert.value)
                .bind(alert.window_start_ms)
                .bind(alert.window_end_ms)
                .bind(now_ms)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                outcome.alerts.push(alert_from_row(&row)?);
            }
        }
        for chunk in batch.dead_letters.chunks(ROWS_PER_STATEMENT) {
            let mut builder: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO dead_letters (received_at, source, reason, error, sensor_id, event_type, event_time, \
                 partition, position, payload) ",
            );
            builder.push_values(chunk, |mut row, letter| {
                row.push_bind(letter.received_at_ms)
                    .push_bind(letter.source.as_str())
                    .push_bind(letter.reason.as_str())
                    .push_bind(letter.error.as_str())
                    .push_bind(letter.sensor_id.as_deref())
                    .push_bind(letter.event_type.as_deref())
                    .push_bind(letter.event_time_ms)
                    .push_bind(letter.partition.map(i64::from))
                    .push_bind(letter.position.map(|p| i64::try_from(p).unwrap_or(i64::MAX)))
                    .push_bind(letter.payload.as_str());
            });
            builder.push(" ON CONFLICT (partition, position) WHERE position IS NOT NULL DO NOTHING");
            builder.build().execute(&mut *tx).await?;
        }
        for checkpoint in batch.checkpoints {
            let partition = i64::from(checkpoint.partition);
            let current: Option<i64> = sqlx::query_scalar("SELECT epoch FROM partition_owners WHERE partition = ?")
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
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (partition) DO UPDATE SET \
                 partitions = excluded.partitions, next_position = excluded.next_position, \
                 clock_ms = excluded.clock_ms, checkpoint_id = excluded.checkpoint_id, taken_at = excluded.taken_at, \
                 base_position = excluded.base_position, events_processed = excluded.events_processed, \
                 events_late = excluded.events_late, dead_lettered = excluded.dead_lettered, \
                 skipped = excluded.skipped, owner_epoch = excluded.owner_epoch",
            )
            .bind(partition)
            .bind(i64::from(checkpoint.partitions))
            .bind(sql::int(checkpoint.next_position))
            .bind(checkpoint.clock_ms)
            .bind(sql::int(checkpoint.checkpoint_id))
            .bind(checkpoint.taken_at_ms)
            .bind(sql::int(counters.base_position))
            .bind(sql::int(counters.events_processed))
            .bind(sql::int(counters.events_late))
            .bind(sql::int(counters.dead_lettered))
            .bind(sql::int(counters.skipped))
            .bind(sql::int(checkpoint.owner_epoch))
            .execute(&mut *tx)
            .await?;
            for chunk in checkpoint.upserts.chunks(ROWS_PER_STATEMENT) {
                let mut builder: QueryBuilder<Sqlite> =
                    QueryBuilder::new("INSERT INTO checkpoint_keys (partition, sensor_id, event_type, state) ");
                builder.push_values(chunk, |mut row, key| {
                    row.push_bind(partition)
                        .push_bind(key.sensor_id.as_str())
                        .push_bind(key.event_type.as_str())
                        .push_bind(key.state.as_slice());
                });
                builder.push(" ON CONFLICT (partition, sensor_id, event_type) DO UPDATE SET state = excluded.state");
                builder.build().execute(&mut *tx).await?;
            }
            for (sensor_id, event_type) in &checkpoint.deletes {
                sqlx::query("DELETE FROM checkpoint_keys WHERE partition = ? AND sensor_id = ? AND event_type = ?")
                    .bind(partition)
                    .bind(sensor_id.as_str())
                    .bind(event_type.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }
}

fn alert_from_row(row: &SqliteRow) -> Result<AlertRow, sqlx::Error> {
    Ok(AlertRow {
        id: row.try_get("id")?,
        rule: row.try_get("rule")?,
        kind: row.try_get("kind")?,
        sensor_id: row.try_get("sensor_id")?,
        event_type: row.try_get("event_type")?,
        severity: row.try_get("severity")?,
        state: row.try_get("state")?,
        started_at: row.try_get("started_at")?,
        resolved_at: row.try_get("resolved_at")?,
        message: row.try_get("message")?,
        value: row.try_get("value")?,
        window_start: row.try_get("window_start")?,
        window_end: row.try_get("window_end")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn prediction_from_row(row: &SqliteRow) -> Result<Prediction, sqlx::Error> {
    Ok(Prediction {
        id: row.try_get("id")?,
        sensor_id: row.try_get("sensor_id")?,
        event_type: row.try_get("event_type")?,
        window_start: row.try_get("window_start")?,
        window_end: row.try_get("window_end")?,
        event_count: row.try_get("event_count")?,
        avg_value: row.try_get("avg_value")?,
        min_value: row.try_get("min_value")?,
        max_value: row.try_get("max_value")?,
        stddev: row.try_get("stddev")?,
        prediction_score: row.try_get("prediction_score")?,
        anomaly: row.try_get("anomaly")?,
        severity: row.try_get("severity")?,
        revision: row.try_get("revision")?,
        explanation: row.try_get("explanation")?,
        window_kind: row.try_get("window_kind")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
                "INSERT INTO partition_owners (partition, epoch, owner, acquired_at) VALUES (?, 1, ?, ?) \
                 ON CONFLICT (partition) DO UPDATE SET epoch = partition_owners.epoch + 1, owner = excluded.owner, \
                 acquired_at = excluded.acquired_at RETURNING epoch",
            )
            .bind(i64::from(partition))
            .bind(owner)
            .bind(chrono::Utc::now().timestamp_millis())
            .fetch_one(&self.writer)
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
                 events_late, dead_lettered, skipped FROM checkpoints WHERE partition = ?",
            )
            .bind(i64::from(partition))
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let stored_partitions: i64 = row.try_get("partitions")?;
            if stored_partitions != i64::from(partitions) {
                return Err(StoreError::Incompatible(format!(
                    "checkpoints in the store were taken with {stored_partitions} partitions but \
                     pipeline.partitions is {partitions}; keep the partition count or start with an empty store"
                )));
            }
            let keys = sqlx::query("SELECT sensor_id, event_type, state FROM checkpoint_keys WHERE partition = ?")
                .bind(i64::from(partition))
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
            let next_position: i64 = row.try_get("next_position")?;
            let checkpoint_id: i64 = row.try_get("checkpoint_id")?;
            Ok(Some(RestoredPartition {
                next_position: u64::try_from(next_position).unwrap_or(0),
                clock_ms: row.try_get("clock_ms")?,
                checkpoint_id: u64::try_from(checkpoint_id).unwrap_or(0),
                counters: sql::counters_from_row(&row)?,
                keys,
            }))
        })
        .await
    }

    async fn predictions(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError> {
        self.timed(async {
            let rows =
                sql::predictions::<Sqlite, i64>(query, |ms| ms, &text_filter).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(prediction_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate(items, query.limit))
        })
        .await
    }

    async fn replay(&self, query: &ReplayQuery) -> Result<Page<Prediction>, StoreError> {
        self.timed(async {
            let rows = sql::replay::<Sqlite, i64>(query, |ms| ms).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(prediction_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate(items, query.limit))
        })
        .await
    }

    async fn alerts(&self, query: &AlertQuery) -> Result<Page<AlertRow>, StoreError> {
        self.timed(async {
            let rows = sql::alerts::<Sqlite, i64>(query, |ms| ms).build().fetch_all(&self.pool).await?;
            let items = rows.iter().map(alert_from_row).collect::<Result<Vec<_>, _>>()?;
            Ok(super::paginate_alerts(items, query.limit))
        })
        .await
    }

    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError> {
        self.timed(async {
            let bucket = |builder: &mut QueryBuilder<Sqlite>, interval: i64| {
                builder.push("((window_start / ").push_bind(interval).push(") * ").push_bind(interval).push(")");
            };
            let rows = sql::histogram::<Sqlite, i64>(query, &bucket, |ms| ms, &text_filter)
                .build()
                .fetch_all(&self.pool)
                .await?;
            Ok(rows.iter().map(super::bucket_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn top_sensors(&self, query: &TopQuery) -> Result<Vec<TopSensor>, StoreError> {
        self.timed(async {
            let rows = sql::top_sensors::<Sqlite, i64>(query, |ms| ms).build().fetch_all(&self.pool).await?;
            Ok(rows.iter().map(super::top_sensor_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn summary(&self, since_ms: i64) -> Result<Vec<TypeSummary>, StoreError> {
        self.timed(async {
            let rows = sql::summary::<Sqlite, i64>(since_ms).build().fetch_all(&self.pool).await?;
            Ok(rows.iter().map(super::summary_from_row).collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRow>, StoreError> {
        self.timed(async {
            let rows = sql::dead_letters::<Sqlite>(query).build().fetch_all(&self.pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(DeadLetterRow {
                        id: row.try_get("id")?,
                        received_at: row.try_get("received_at")?,
                        source: row.try_get("source")?,
                        reason: row.try_get("reason")?,
                        error: row.try_get("error")?,
                        sensor_id: row.try_get("sensor_id")?,
                        event_type: row.try_get("event_type")?,
                        event_time: row.try_get("event_time")?,
                        partition: row.try_get("partition")?,
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
            let old = sqlx::query("DELETE FROM dead_letters WHERE received_at < ?1")
                .bind(older_than_ms)
                .execute(&self.writer)
                .await?
                .rows_affected();
            let over = sqlx::query(
                "DELETE FROM dead_letters WHERE id <= (SELECT id FROM dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )
            .bind(i64::try_from(keep_rows).unwrap_or(i64::MAX))
            .execute(&self.writer)
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
        self.checkpointer.abort();
        // A last full checkpoint leaves a compact database file behind.
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.writer).await;
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// ` AND` the text query as FTS5 `MATCH` conditions: the terms that must match in one,
/// each excluded term in a `NOT IN` of its own (FTS5's `NOT` needs a left operand).
fn text_filter(builder: &mut QueryBuilder<Sqlite>, query: &TextQuery) {
    let positive: Vec<String> = query.positive().map(fts5_term).collect();
    if !positive.is_empty() {
        builder
            .push(" AND id IN (SELECT rowid FROM predictions_fts WHERE predictions_fts MATCH ")
            .push_bind(positive.join(" AND "))
            .push(")");
    }
    for term in query.negative() {
        builder
            .push(" AND id NOT IN (SELECT rowid FROM predictions_fts WHERE predictions_fts MATCH ")
            .push_bind(fts5_term(term))
            .push(")");
    }
}

/// `"w1 w2"` or `"w1 w2" *`: words are letters and digits only, so quoting is enough.
fn fts5_term(term: &Term) -> String {
    let phrase = term.words.join(" ");
    if term.prefix { format!("\"{phrase}\" *") } else { format!("\"{phrase}\"") }
}
