-- Full-text search over window results (`/api/search`): the words of sensor id, event
-- type, severity and explanation as a tsvector with a GIN index. Words are runs of
-- letters and digits, lowercased, with the 'simple' configuration (no stemming, no stop
-- words): the same rule as the query parser and the other backends.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS search_words tsvector
    GENERATED ALWAYS AS (
        to_tsvector('simple', regexp_replace(
            lower(sensor_id || ' ' || event_type || ' ' || severity || ' ' || explanation),
            '[^[:alnum:]]+', ' ', 'g'))
    ) STORED;

CREATE INDEX IF NOT EXISTS predictions_search ON predictions USING GIN (search_words);
