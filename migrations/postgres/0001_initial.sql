-- tidemark deployment store (PostgreSQL). Times are TIMESTAMPTZ so Grafana and the
-- original SQL (`window_start`, `avg_value`, …) work unchanged.

CREATE TABLE IF NOT EXISTS predictions (
    id               BIGSERIAL PRIMARY KEY,
    event_type       TEXT             NOT NULL,
    window_start     TIMESTAMPTZ      NOT NULL,
    window_end       TIMESTAMPTZ      NOT NULL,
    event_count      BIGINT           NOT NULL,
    avg_value        DOUBLE PRECISION NOT NULL,
    prediction_score DOUBLE PRECISION NOT NULL,
    created_at       TIMESTAMPTZ      NOT NULL DEFAULT now(),
    sensor_id        TEXT             NOT NULL,
    min_value        DOUBLE PRECISION NOT NULL,
    max_value        DOUBLE PRECISION NOT NULL,
    stddev           DOUBLE PRECISION NOT NULL,
    anomaly          BOOLEAN          NOT NULL,
    severity         TEXT             NOT NULL,
    revision         INTEGER          NOT NULL,
    explanation      TEXT             NOT NULL DEFAULT '',
    updated_at       TIMESTAMPTZ      NOT NULL DEFAULT now(),
    CONSTRAINT predictions_window_key UNIQUE (sensor_id, event_type, window_start)
);

-- API (newest first, cursor on (window_start, id)) and Grafana time ranges; the unique
-- key serves per-sensor queries.
CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (window_start DESC, id DESC);
CREATE INDEX IF NOT EXISTS predictions_by_type_time ON predictions (event_type, window_start DESC);
CREATE INDEX IF NOT EXISTS predictions_anomalies ON predictions (window_start DESC, id DESC) WHERE anomaly;

CREATE OR REPLACE VIEW alerts AS
    SELECT id, sensor_id, event_type, window_start, window_end, event_count, avg_value,
           min_value, max_value, stddev, prediction_score, severity, revision, explanation,
           created_at, updated_at
    FROM predictions
    WHERE anomaly;

CREATE TABLE IF NOT EXISTS dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    source      TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    error       TEXT        NOT NULL,
    sensor_id   TEXT,
    event_type  TEXT,
    event_time  TIMESTAMPTZ,
    partition   INTEGER,
    position    BIGINT,
    payload     TEXT        NOT NULL
);

CREATE INDEX IF NOT EXISTS dead_letters_by_reason ON dead_letters (reason, id DESC);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (received_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_position ON dead_letters (partition, position)
    WHERE position IS NOT NULL;

CREATE TABLE IF NOT EXISTS checkpoints (
    partition     INTEGER     PRIMARY KEY,
    partitions    INTEGER     NOT NULL,
    next_position BIGINT      NOT NULL,
    clock_ms      BIGINT      NOT NULL,
    checkpoint_id BIGINT      NOT NULL,
    taken_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS checkpoint_keys (
    partition  INTEGER NOT NULL,
    sensor_id  TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    state      BYTEA   NOT NULL,
    PRIMARY KEY (partition, sensor_id, event_type)
);
