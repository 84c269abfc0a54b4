-- Alerts raised by the alert rules (`[rules.<name>]`): one row per alert, written when
-- it fires and updated when it resolves. They replace the `alerts` view of anomalous
-- windows; the anomalous windows stored so far become resolved alerts of the built-in
-- `anomaly` rule (one per window, as that view listed them).
DROP VIEW IF EXISTS alerts;

CREATE TABLE IF NOT EXISTS alerts (
    id           BIGSERIAL PRIMARY KEY,
    rule         TEXT             NOT NULL,
    kind         TEXT             NOT NULL,
    sensor_id    TEXT             NOT NULL,
    event_type   TEXT             NOT NULL,
    severity     TEXT             NOT NULL,
    state        TEXT             NOT NULL,
    started_at   TIMESTAMPTZ      NOT NULL,
    resolved_at  TIMESTAMPTZ,
    message      TEXT             NOT NULL,
    value        DOUBLE PRECISION,
    window_start TIMESTAMPTZ,
    window_end   TIMESTAMPTZ,
    created_at   TIMESTAMPTZ      NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ      NOT NULL DEFAULT now(),
    CONSTRAINT alerts_key UNIQUE (rule, sensor_id, event_type, started_at)
);

CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS alerts_firing ON alerts (started_at DESC, id DESC) WHERE state = 'firing';

INSERT INTO alerts (rule, kind, sensor_id, event_type, severity, state, started_at, resolved_at, message, value,
                    window_start, window_end, created_at, updated_at)
    SELECT 'anomaly', 'anomaly', sensor_id, event_type, severity, 'resolved', window_start, window_end,
           sensor_id || ' ' || event_type || ': anomalous window: ' || explanation, avg_value,
           window_start, window_end, created_at, updated_at
    FROM predictions WHERE anomaly
    ON CONFLICT DO NOTHING;
