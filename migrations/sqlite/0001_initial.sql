-- tidemark embedded store (SQLite). Times are epoch milliseconds (INTEGER).

CREATE TABLE IF NOT EXISTS predictions (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sensor_id        TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    window_start     INTEGER NOT NULL,
    window_end       INTEGER NOT NULL,
    event_count      INTEGER NOT NULL,
    avg_value        REAL    NOT NULL,
    min_value        REAL    NOT NULL,
    max_value        REAL    NOT NULL,
    stddev           REAL    NOT NULL,
    prediction_score REAL    NOT NULL,
    anomaly          INTEGER NOT NULL,
    severity         TEXT    NOT NULL,
    revision         INTEGER NOT NULL,
    explanation      TEXT    NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (sensor_id, event_type, window_start)
);

-- The unique key serves per-sensor queries (its prefix); time-range queries and the
-- summaries use the time index. Each extra index costs every upsert.
CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (window_start DESC, id DESC);
CREATE INDEX IF NOT EXISTS predictions_anomalies ON predictions (window_start DESC, id DESC) WHERE anomaly = 1;

-- Alerts are the anomalous windows; a view keeps them in step with late revisions.
CREATE VIEW IF NOT EXISTS alerts AS
    SELECT id, sensor_id, event_type, window_start, window_end, event_count, avg_value,
           min_value, max_value, stddev, prediction_score, severity, revision, explanation,
           created_at, updated_at
    FROM predictions
    WHERE anomaly = 1;

CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    sensor_id   TEXT,
    event_type  TEXT,
    event_time  INTEGER,
    partition   INTEGER,
    position    INTEGER,
    payload     TEXT    NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_by_reason ON dead_letters (reason, id DESC);
-- An event dead-lettered by the pipeline (late, poison) is kept once, however often a
-- replay meets it again.
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_position ON dead_letters (partition, position)
    WHERE position IS NOT NULL;

CREATE TABLE IF NOT EXISTS checkpoints (
    partition     INTEGER PRIMARY KEY,
    partitions    INTEGER NOT NULL,
    next_position INTEGER NOT NULL,
    clock_ms      INTEGER NOT NULL,
    checkpoint_id INTEGER NOT NULL,
    taken_at      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS checkpoint_keys (
    partition  INTEGER NOT NULL,
    sensor_id  TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    state      BLOB    NOT NULL,
    PRIMARY KEY (partition, sensor_id, event_type)
);
