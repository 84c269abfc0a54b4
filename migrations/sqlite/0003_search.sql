-- Full-text search over window results (`/api/search`): an FTS5 index of the words of
-- sensor id, event type, severity and explanation, kept in step by triggers. Words are
-- runs of letters and digits, compared case-insensitively (the same rule as the query
-- parser and the other backends).
CREATE VIRTUAL TABLE IF NOT EXISTS predictions_fts USING fts5(
    body,
    content = '',
    contentless_delete = 1,
    tokenize = "unicode61 remove_diacritics 0"
);

INSERT INTO predictions_fts (rowid, body)
    SELECT id, sensor_id || ' ' || event_type || ' ' || severity || ' ' || explanation FROM predictions;

CREATE TRIGGER IF NOT EXISTS predictions_fts_insert AFTER INSERT ON predictions BEGIN
    INSERT INTO predictions_fts (rowid, body)
        VALUES (new.id, new.sensor_id || ' ' || new.event_type || ' ' || new.severity || ' ' || new.explanation);
END;

-- A revision usually keeps severity and explanation: only a change re-indexes the row.
CREATE TRIGGER IF NOT EXISTS predictions_fts_update AFTER UPDATE OF severity, explanation ON predictions
    WHEN old.severity IS NOT new.severity OR old.explanation IS NOT new.explanation BEGIN
    DELETE FROM predictions_fts WHERE rowid = old.id;
    INSERT INTO predictions_fts (rowid, body)
        VALUES (new.id, new.sensor_id || ' ' || new.event_type || ' ' || new.severity || ' ' || new.explanation);
END;

CREATE TRIGGER IF NOT EXISTS predictions_fts_delete AFTER DELETE ON predictions BEGIN
    DELETE FROM predictions_fts WHERE rowid = old.id;
END;
