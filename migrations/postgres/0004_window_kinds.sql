-- Window kinds (tumbling, hopping, session) per event type: a result names its kind.
-- A window is still keyed by (sensor_id, event_type, window_start): an event type has
-- one kind at a time, and a session's later revision (grown end) replaces its row.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS window_kind TEXT NOT NULL DEFAULT 'tumbling';
