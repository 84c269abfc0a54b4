//! `/api/search`: free text over window results, and counts per interval for charts.
//!
//! The query language is small on purpose and the same on every backend: words
//! (`overheat`), quoted phrases (`"sensor 042"`), `-` to exclude a word or phrase and a
//! trailing `*` for a prefix (`temp*`). Every term must match (AND). Like a search box
//! (and Elasticsearch's `simple_query_string`) it is lenient: a quote left open runs to
//! the end, and text with no letters or digits is no filter. Text is split into
//! words at every character that is not a letter or a digit and compared lowercase, so
//! `sensor-042` is the phrase `sensor 042` everywhere. A query is parsed here into
//! [`TextQuery`] and each backend translates that structure (SQLite FTS5 `MATCH`,
//! PostgreSQL `tsquery`, Elasticsearch `match_phrase`); user text never reaches a query
//! language unparsed.

use async_trait::async_trait;
use serde::Serialize;

use crate::store::{Page, Prediction, PredictionQuery, StoreError};

/// Longest `q`, in characters.
pub const MAX_QUERY_CHARS: usize = 512;

/// One word or phrase of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// Lowercase words, in order; at least one.
    pub words: Vec<String>,
    /// The last word is a prefix.
    pub prefix: bool,
    /// Rows that match are excluded.
    pub negated: bool,
}

/// A parsed `q`: rows match every term that is not negated and none that is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextQuery {
    pub terms: Vec<Term>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("longer than {MAX_QUERY_CHARS} characters")]
    TooLong,
}

/// Split text into the words search compares: maximal runs of letters and digits,
/// lowercased. Lowercasing can add combining marks (`İ` becomes `i` + U+0307): they are
/// dropped, so a word is letters and digits only (found by fuzzing).
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| word.chars().flat_map(char::to_lowercase).filter(|c| c.is_alphanumeric()).collect::<String>())
        .filter(|word| !word.is_empty())
}

impl TextQuery {
    /// Parse the query syntax. A `q` with no letters or digits is no text filter
    /// (`Ok(None)`).
    pub fn parse(q: &str) -> Result<Option<Self>, QueryError> {
        if q.chars().count() > MAX_QUERY_CHARS {
            return Err(QueryError::TooLong);
        }
        if q.trim().is_empty() {
            return Ok(None);
        }
        let mut terms = Vec::new();
        let mut rest = q;
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            let negated = rest.starts_with('-');
            if negated {
                rest = &rest[1..];
            }
            let raw;
            if let Some(quoted) = rest.strip_prefix('"') {
                match quoted.find('"') {
                    Some(at) => {
                        raw = &quoted[..at];
                        rest = &quoted[at + 1..];
                    }
                    None => {
                        raw = quoted;
                        rest = "";
                    }
                }
            } else {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                raw = &rest[..end];
                rest = &rest[end..];
            }
            // A `*` right after the word or the closing quote.
            let (raw, prefix) = match raw.strip_suffix('*') {
                Some(stripped) => (stripped, true),
                None => match rest.strip_prefix('*') {
                    Some(after) => {
                        rest = after;
                        (raw, true)
                    }
                    None => (raw, false),
                },
            };
            let words: Vec<String> = words(raw).collect();
            if words.is_empty() {
                continue; // punctuation only: nothing to match
            }
            terms.push(Term { words, prefix, negated });
        }
        Ok((!terms.is_empty()).then_some(Self { terms }))
    }

    pub fn positive(&self) -> impl Iterator<Item = &Term> {
        self.terms.iter().filter(|term| !term.negated)
    }

    pub fn negative(&self) -> impl Iterator<Item = &Term> {
        self.terms.iter().filter(|term| term.negated)
    }

    /// Whether a text matches (the reference semantics every backend implements; used
    /// by the tests and the Elasticsearch stand-in).
    pub fn matches(&self, text: &str) -> bool {
        let words: Vec<String> = words(text).collect();
        self.terms.iter().all(|term| term.matches(&words) != term.negated)
    }
}

impl Term {
    /// Whether the words of a text contain this term's words in a row.
    pub fn matches(&self, words: &[String]) -> bool {
        let n = self.words.len();
        if words.len() < n {
            return false;
        }
        (0..=words.len() - n).any(|start| {
            self.words.iter().enumerate().all(|(k, word)| {
                let candidate = &words[start + k];
                if self.prefix && k == n - 1 { candidate.starts_with(word.as_str()) } else { candidate == word }
            })
        })
    }
}

/// The text of a result that search sees.
pub fn searchable_text(sensor_id: &str, event_type: &str, severity: &str, explanation: &str) -> String {
    format!("{sensor_id} {event_type} {severity} {explanation}")
}

/// `GET /api/search/histogram`.
#[derive(Clone, Debug)]
pub struct HistogramQuery {
    /// The filters and text (`limit` and `cursor` are not used).
    pub query: PredictionQuery,
    pub interval_ms: i64,
}

/// Windows and anomalies of one event type whose window starts in one interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistogramBucket {
    #[serde(serialize_with = "crate::store::ser::millis_rfc3339")]
    pub start: i64,
    pub event_type: String,
    pub windows: i64,
    pub anomalies: i64,
}

/// Most buckets one histogram may return (intervals × event types).
pub const MAX_BUCKETS: usize = 10_000;

/// What answers `/api/search`: the store, or Elasticsearch when it is configured.
#[async_trait]
pub trait SearchBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Newest first, like `/api/predictions`, with the same cursors.
    async fn search(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError>;
    /// Ordered by bucket start, then event type; only non-empty buckets.
    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(words: &[&str], prefix: bool, negated: bool) -> Term {
        Term { words: words.iter().map(|w| w.to_string()).collect(), prefix, negated }
    }

    #[test]
    fn parses_words_phrases_exclusions_and_prefixes() {
        let query = TextQuery::parse(r#"Overheat "sensor-042" -LOW temp* -"z score"*"#).unwrap().unwrap();
        assert_eq!(
            query.terms,
            vec![
                term(&["overheat"], false, false),
                term(&["sensor", "042"], false, false),
                term(&["low"], false, true),
                term(&["temp"], true, false),
                term(&["z", "score"], true, true),
            ]
        );
    }

    #[test]
    fn lenient_like_a_search_box() {
        assert_eq!(TextQuery::parse("  "), Ok(None));
        assert_eq!(TextQuery::parse("--- !! *"), Ok(None));
        assert_eq!(
            TextQuery::parse("\"open phrase").unwrap().unwrap().terms,
            vec![term(&["open", "phrase"], false, false)]
        );
        assert_eq!(TextQuery::parse("a*").unwrap().unwrap().terms, vec![term(&["a"], true, false)]);
        assert_eq!(TextQuery::parse(&"é".repeat(512)).map(|q| q.is_some()), Ok(true));
        assert_eq!(TextQuery::parse(&"x".repeat(513)), Err(QueryError::TooLong));
    }

    #[test]
    fn lowercasing_keeps_words_alphanumeric() {
        assert_eq!(words("İstanbul SENSOR-ß").collect::<Vec<_>>(), vec!["istanbul", "sensor", "ß"]);
    }

    #[test]
    fn unicode_whitespace_separates_terms() {
        // U+0085 and U+3000 are whitespace to `char::is_whitespace`, not to ASCII checks.
        let query = TextQuery::parse("ô\u{85}x\u{3000}-y").unwrap().unwrap();
        assert_eq!(
            query.terms,
            vec![term(&["ô"], false, false), term(&["x"], false, false), term(&["y"], false, true)]
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_into_alphanumeric_words(q in "\\PC{0,80}") {
            if let Ok(Some(query)) = TextQuery::parse(&q) {
                for term in &query.terms {
                    proptest::prop_assert!(term.words.iter().all(|w| w.chars().all(char::is_alphanumeric)));
                }
            }
        }
    }

    #[test]
    fn reference_semantics() {
        let text = searchable_text("sensor-042", "temperature", "HIGH", "avg 81.5 is 4.2σ above the usual");
        let matches = |q: &str| TextQuery::parse(q).unwrap().unwrap().matches(&text);
        assert!(matches("sensor-042"));
        assert!(matches("\"sensor 042\" temp*"));
        assert!(matches("SENSOR 04*"));
        assert!(!matches("SENSOR 42*"));
        assert!(!matches("sensor-043"));
        assert!(!matches("-high"));
        assert!(matches("-low usual"));
        assert!(!matches("\"042 sensor\""));
    }
}
