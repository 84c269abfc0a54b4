//! Result, dead-letter and checkpoint storage behind one [`Store`] trait.
//!
//! SQLite is the embedded default; PostgreSQL implements the same trait for deployments.
//! The backend is chosen by the scheme of `store.url`. Writes are batched and idempotent:
//! a window is keyed by `(sensor_id, event_type, window_start)` and a re-emitted window
//! overwrites its row, never adding one.

mod postgres;
mod sql;
mod sqlite;

pub use postgres::{PostgresStore, WriteMethod};
pub use sqlite::SqliteStore;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::config::StoreConfig;
use crate::messages::{
    CheckpointData, DeadLetter, PartitionId, RejectReason, RestoredPartition, Severity, WindowResult,
};
use crate::search::{HistogramBucket, HistogramQuery, SearchBackend};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out: worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database refused the content: retrying will not help.
    #[error("store rejected the write: {0}")]
    Rejected(String),
    /// Stored state does not fit this configuration (e.g. another partition count).
    #[error("{0}")]
    Incompatible(String),
    /// A bug or a schema mismatch (e.g. a column that cannot be decoded).
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::Tls(_) | E::Protocol(_) | E::WorkerCrashed => {
                Self::Unavailable(error.to_string())
            }
            E::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // PostgreSQL: class 08 connection, 40 transaction rollback (serialization,
                // deadlock), 53 insufficient resources, 57 operator intervention (shutdown).
                // SQLite: 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL.
                let transient = ["08", "40", "53", "57"].iter().any(|class| code.starts_with(class))
                    || matches!(code.as_str(), "5" | "6" | "10" | "13" | "261" | "262" | "517");
                if transient { Self::Unavailable(error.to_string()) } else { Self::Rejected(error.to_string()) }
            }
            E::ColumnDecode { .. }
            | E::Decode(_)
            | E::ColumnNotFound(_)
            | E::ColumnIndexOutOfBounds { .. }
            | E::TypeNotFound { .. }
            | E::RowNotFound
            | E::Configuration(_)
            | E::Encode(_) => Self::Internal(error.to_string()),
            _ => Self::Unavailable(error.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Internal(format!("migration failed: {error}"))
    }
}

/// Everything one store-sink flush writes, in one transaction.
#[derive(Default)]
pub struct WriteBatch<'a> {
    pub results: &'a [WindowResult],
    pub alerts: &'a [crate::rules::Alert],
    pub dead_letters: &'a [DeadLetter],
    pub checkpoints: &'a [CheckpointData],
}

impl WriteBatch<'_> {
    pub fn is_empty(&self) -> bool {
        self.results.is_empty() && self.alerts.is_empty() && self.dead_letters.is_empty() && self.checkpoints.is_empty()
    }
}

/// What a write did besides committing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteOutcome {
    /// Checkpoints refused because another owner took their partition since:
    /// `(partition, checkpoint_id)`.
    pub fenced: Vec<(PartitionId, u64)>,
    /// The result rows this write inserted or changed (a revision older than the stored
    /// one changes nothing and is not listed), with the ids and times the store gave them.
    pub written: Vec<WrittenRow>,
    /// The alerts this write inserted or resolved (a replayed transition the store has
    /// already is not listed).
    pub alerts: Vec<AlertRow>,
}

/// A stored alert: the item of `GET /api/alerts` and of the WebSocket's `alerts`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertRow {
    pub id: i64,
    pub rule: String,
    /// The rule's kind: anomaly, threshold, consecutive, rate_of_change, absence, pattern.
    pub kind: String,
    pub sensor_id: String,
    pub event_type: String,
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// Event time the condition started to hold.
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub started_at: i64,
    /// Event time it stopped.
    #[serde(serialize_with = "ser::opt_millis_rfc3339")]
    pub resolved_at: Option<i64>,
    pub message: String,
    /// The statistic the rule looked at when the alert fired.
    pub value: Option<f64>,
    /// The window that raised it (absence alerts have none).
    #[serde(serialize_with = "ser::opt_millis_rfc3339")]
    pub window_start: Option<i64>,
    #[serde(serialize_with = "ser::opt_millis_rfc3339")]
    pub window_end: Option<i64>,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub updated_at: i64,
}

impl AlertRow {
    /// Which version of the row this is (firing 0, resolved 1): what a live message and
    /// a replay may both carry.
    pub fn version(&self) -> i64 {
        i64::from(self.state == "resolved")
    }
}

/// `GET /api/alerts` (newest first by start) and WebSocket replays (oldest first).
#[derive(Clone, Debug, Default)]
pub struct AlertQuery {
    pub sensor_ids: Vec<String>,
    pub event_types: Vec<String>,
    pub rules: Vec<String>,
    pub state: Option<crate::rules::AlertState>,
    pub severities: Vec<Severity>,
    /// Started at or after (epoch ms).
    pub from_ms: Option<i64>,
    /// Started before (epoch ms).
    pub to_ms: Option<i64>,
    /// Newest first: the last row of the previous page (`window_start_ms` is its start).
    pub cursor: Option<Cursor>,
    /// Oldest first: rows with an id above this (a replay's `since` or its last row).
    pub after_id: Option<i64>,
    pub limit: u32,
}

/// A prediction row as a write left it: what the live feed adds to a window result to
/// send it in the REST shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenRow {
    pub id: i64,
    pub sensor_id: String,
    pub event_type: String,
    pub window_start_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Whether a checkpoint written under `epoch` may replace the stored one when the
/// partition's current epoch is `current` (none: nobody acquired it; 0: unfenced writer).
pub fn checkpoint_allowed(epoch: u64, current: Option<i64>) -> bool {
    epoch == 0 || current.is_none_or(|current| current == i64::try_from(epoch).unwrap_or(i64::MAX))
}

/// A stored window result.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    pub id: i64,
    pub sensor_id: String,
    pub event_type: String,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub window_start: i64,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub window_end: i64,
    pub event_count: i64,
    pub avg_value: f64,
    pub min_value: f64,
    pub max_value: f64,
    pub stddev: f64,
    pub prediction_score: f64,
    pub anomaly: bool,
    pub severity: String,
    pub revision: i64,
    pub explanation: String,
    /// `tumbling`, `hopping` or `session`.
    pub window_kind: String,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub updated_at: i64,
}

impl Prediction {
    /// A window result as a write stored it (`row` names the same window).
    pub fn from_written(result: &WindowResult, row: &WrittenRow) -> Self {
        Self {
            id: row.id,
            sensor_id: result.sensor_id.to_string(),
            event_type: result.event_type.to_string(),
            window_start: result.window_start_ms,
            window_end: result.window_end_ms,
            event_count: i64::try_from(result.event_count).unwrap_or(i64::MAX),
            avg_value: result.avg_value,
            min_value: result.min_value,
            max_value: result.max_value,
            stddev: result.stddev,
            prediction_score: result.prediction_score,
            anomaly: result.anomaly,
            severity: result.severity.as_str().to_string(),
            revision: i64::from(result.revision),
            explanation: result.explanation.clone(),
            window_kind: result.window_kind.as_str().to_string(),
            created_at: row.created_at_ms,
            updated_at: row.updated_at_ms,
        }
    }
}

/// Keyset pagination position: the last row of the previous page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub window_start_ms: i64,
    pub id: i64,
}

#[derive(Clone, Debug, Default)]
pub struct PredictionQuery {
    pub sensor_id: Option<String>,
    pub event_type: Option<String>,
    /// Window start at or after (epoch ms).
    pub from_ms: Option<i64>,
    /// Window start before (epoch ms).
    pub to_ms: Option<i64>,
    pub anomaly: Option<bool>,
    pub severities: Vec<Severity>,
    pub limit: u32,
    pub cursor: Option<Cursor>,
    /// Free text (`/api/search`).
    pub text: Option<crate::search::TextQuery>,
}

/// Where a replay starts (the WebSocket feed's `since`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Windows starting at or after this instant (epoch ms).
    WindowStart(i64),
    /// Rows with an id above this one (the last id a client saw).
    AfterId(i64),
}

/// Stored predictions after a point, oldest first, for a live subscription to replay
/// before it goes live. Empty lists match everything.
#[derive(Clone, Debug)]
pub struct ReplayQuery {
    pub sensor_ids: Vec<String>,
    pub event_types: Vec<String>,
    pub anomaly: Option<bool>,
    pub severities: Vec<Severity>,
    pub since: Since,
    /// The last row of the previous page (ascending keyset).
    pub after: Option<Cursor>,
    pub limit: u32,
}

#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopBy {
    AvgValue,
    MaxValue,
    EventCount,
    PredictionScore,
}

impl TopBy {
    pub const NAMES: [&'static str; 4] = ["avgValue", "maxValue", "eventCount", "predictionScore"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "avgValue" | "avg_value" => Some(Self::AvgValue),
            "maxValue" | "max_value" => Some(Self::MaxValue),
            "eventCount" | "event_count" => Some(Self::EventCount),
            "predictionScore" | "prediction_score" => Some(Self::PredictionScore),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TopQuery {
    /// Windows starting at or after (epoch ms).
    pub since_ms: i64,
    pub by: TopBy,
    pub n: u32,
    pub event_type: Option<String>,
}

/// One sensor's aggregate over the recent windows of one event type.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopSensor {
    pub sensor_id: String,
    pub event_type: String,
    /// The ranked measure.
    pub value: f64,
    pub windows: i64,
    pub event_count: i64,
    /// Count-weighted average of the window averages.
    pub avg_value: f64,
    pub max_value: f64,
    pub max_prediction_score: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeSummary {
    pub event_type: String,
    pub windows: i64,
    pub events: i64,
    pub sensors: i64,
    pub avg_value: f64,
    pub min_value: f64,
    pub max_value: f64,
    pub anomalies: i64,
}

#[derive(Clone, Debug, Default)]
pub struct DeadLetterQuery {
    pub reason: Option<RejectReason>,
    pub sensor_id: Option<String>,
    pub limit: u32,
    /// Rows with a smaller id (newest first).
    pub before_id: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRow {
    pub id: i64,
    #[serde(serialize_with = "ser::millis_rfc3339")]
    pub received_at: i64,
    pub source: String,
    pub reason: String,
    pub error: String,
    pub sensor_id: Option<String>,
    pub event_type: Option<String>,
    #[serde(serialize_with = "ser::opt_millis_rfc3339")]
    pub event_time: Option<i64>,
    pub partition: Option<i64>,
    pub position: Option<i64>,
    pub payload: String,
}

#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> &'static str;

    /// Results (upserts), dead letters and checkpoints in one transaction. A checkpoint
    /// written under an ownership epoch that is no longer its partition's is left out
    /// (with its key states) and reported in [`WriteOutcome::fenced`].
    async fn write(&self, batch: &WriteBatch<'_>) -> Result<WriteOutcome, StoreError>;

    /// Take ownership of `partition`: the next epoch, which fences checkpoints of every
    /// earlier owner. `owner` names this instance (for operators).
    async fn acquire_partition(&self, partition: PartitionId, owner: &str) -> Result<u64, StoreError>;

    /// The partition's last complete checkpoint, if any. Fails with `Incompatible` when it
    /// was taken with another partition count.
    async fn load_checkpoint(
        &self,
        partition: PartitionId,
        partitions: u32,
    ) -> Result<Option<RestoredPartition>, StoreError>;

    /// Newest first; with `query.text`, only rows whose words match it.
    async fn predictions(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError>;
    /// Windows and anomalies per interval and event type (`/api/search/histogram`).
    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError>;
    /// Predictions after `query.since`, oldest first (window start, then id), one page.
    async fn replay(&self, query: &ReplayQuery) -> Result<Page<Prediction>, StoreError>;
    /// Alerts the rules raised, with the query's filters and order.
    async fn alerts(&self, query: &AlertQuery) -> Result<Page<AlertRow>, StoreError>;
    async fn top_sensors(&self, query: &TopQuery) -> Result<Vec<TopSensor>, StoreError>;
    async fn summary(&self, since_ms: i64) -> Result<Vec<TypeSummary>, StoreError>;
    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRow>, StoreError>;
    async fn dead_letter_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Delete dead letters received before `older_than_ms`, and all but the newest
    /// `keep_rows`; returns how many went.
    async fn prune_dead_letters(&self, older_than_ms: i64, keep_rows: u64) -> Result<u64, StoreError>;

    /// Cheap reachability check for `/ready`.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn close(&self);
}

/// Open (and migrate) the store `store.url` names.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    if config.url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(config).await?))
    } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(config).await?))
    } else {
        Err(StoreError::Incompatible(format!(
            "store.url: unsupported scheme in {}; use sqlite:// or postgres://",
            crate::config::redact_url(&config.url)
        )))
    }
}

/// What `tidemark doctor` reads of a store, changing nothing.
#[derive(Clone, Debug, Default)]
pub struct StoreInspection {
    /// Migration versions applied, ascending.
    pub applied: Vec<i64>,
    /// Migration versions this build knows, ascending.
    pub known: Vec<i64>,
    /// The store server's clock (none for a local file).
    pub clock_ms: Option<i64>,
    /// A SQLite file that does not exist yet (created at the first start).
    pub missing_database: bool,
}

/// Connect without migrating and read the schema version and the clock.
pub async fn inspect(config: &StoreConfig) -> Result<StoreInspection, StoreError> {
    if config.url.starts_with("sqlite:") {
        sqlite::inspect(config).await
    } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
        postgres::inspect(config).await
    } else {
        Err(StoreError::Incompatible(format!(
            "store.url: unsupported scheme in {}; use sqlite:// or postgres://",
            crate::config::redact_url(&config.url)
        )))
    }
}

/// Trim the extra row an alert query fetched, and make the cursor of the next page.
pub(crate) fn paginate_alerts(items: Vec<AlertRow>, limit: u32) -> Page<AlertRow> {
    paginate_by(items, limit, |last| Cursor { window_start_ms: last.started_at, id: last.id })
}

/// Trim the extra row a page query fetched, and make the cursor of the next page.
pub(crate) fn paginate(items: Vec<Prediction>, limit: u32) -> Page<Prediction> {
    paginate_by(items, limit, |last| Cursor { window_start_ms: last.window_start, id: last.id })
}

fn paginate_by<T>(mut items: Vec<T>, limit: u32, cursor: impl Fn(&T) -> Cursor) -> Page<T> {
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}

fn top_sensor_from_row<R: sqlx::Row>(row: &R) -> Result<TopSensor, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(TopSensor {
        sensor_id: row.try_get("sensor_id")?,
        event_type: row.try_get("event_type")?,
        value: row.try_get("measure")?,
        windows: row.try_get("windows")?,
        event_count: row.try_get("events")?,
        avg_value: row.try_get("avg_value")?,
        max_value: row.try_get("max_value")?,
        max_prediction_score: row.try_get("max_score")?,
    })
}

fn bucket_from_row<R: sqlx::Row>(row: &R) -> Result<HistogramBucket, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(HistogramBucket {
        start: row.try_get("bucket")?,
        event_type: row.try_get("event_type")?,
        windows: row.try_get("windows")?,
        anomalies: row.try_get("anomalies")?,
    })
}

/// The store answers `/api/search` when no search cluster is configured.
pub struct StoreSearch(pub Arc<dyn Store>);

#[async_trait]
impl SearchBackend for StoreSearch {
    fn name(&self) -> &'static str {
        self.0.backend()
    }

    async fn search(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError> {
        self.0.predictions(query).await
    }

    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError> {
        self.0.histogram(query).await
    }
}

fn summary_from_row<R: sqlx::Row>(row: &R) -> Result<TypeSummary, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(TypeSummary {
        event_type: row.try_get("event_type")?,
        windows: row.try_get("windows")?,
        events: row.try_get("events")?,
        sensors: row.try_get("sensors")?,
        avg_value: row.try_get("avg_value")?,
        min_value: row.try_get("min_value")?,
        max_value: row.try_get("max_value")?,
        anomalies: row.try_get("anomalies")?,
    })
}

/// Serde helpers rendering epoch milliseconds as RFC 3339.
pub mod ser {
    use serde::Serializer;

    pub fn rfc3339(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| ms.to_string())
    }

    pub fn millis_rfc3339<S: Serializer>(ms: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&rfc3339(*ms))
    }

    pub fn opt_millis_rfc3339<S: Serializer>(ms: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => serializer.serialize_str(&rfc3339(*ms)),
            None => serializer.serialize_none(),
        }
    }
}
