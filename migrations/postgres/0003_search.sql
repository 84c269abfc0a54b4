-- Full-text search over window results (`/api/search`): the words of sensor id, event
-- type, severity and explanation as a tsvector with a GIN index. tidemark writes the
-- column itself (runs of letters and digits, lowercased, with positions: the same rule
-- as the query parser and the other backends), which costs PostgreSQL far less than
-- parsing the text on every upsert; rows written before this migration are filled here
-- with the equivalent SQL.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS search_words tsvector;

UPDATE predictions SET search_words = to_tsvector('simple', regexp_replace(
    lower(sensor_id || ' ' || event_type || ' ' || severity || ' ' || explanation),
    '[^[:alnum:]]+', ' ', 'g'))
WHERE search_words IS NULL;

CREATE INDEX IF NOT EXISTS predictions_search ON predictions USING GIN (search_words);
