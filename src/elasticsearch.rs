//! Elasticsearch: window results as documents, the bulk protocol, the index template,
//! and `/api/search` answered by the cluster. The actor that drives the bulk writes is
//! `actors::sinks::elasticsearch`; everything it decides is here.
//!
//! Documents have a deterministic `_id`, `sensorId|eventType|windowStart` (epoch
//! milliseconds), so a replay or a late revision overwrites the document instead of
//! adding one. Requests go through the official `elasticsearch` crate's transport
//! (connection pool over `elasticsearch.urls`, basic auth or API key, TLS with a CA file).

use std::borrow::Cow;

use async_trait::async_trait;
use bytes::Bytes;
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::transport::{MultiNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{Method, StatusCode, headers::HeaderMap};
use elasticsearch::{Elasticsearch, SearchParts};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::actors::sinks::kafka::ResultRecord;
use crate::config::ElasticsearchConfig;
use crate::messages::WindowResult;
use crate::search::{HistogramBucket, HistogramQuery, MAX_BUCKETS, SearchBackend, Term};
use crate::store::{Page, Prediction, PredictionQuery, StoreError};

/// The analyzer of `searchText`: words are runs of letters and digits, lowercased (the
/// rule of [`crate::search::words`]).
pub const WORDS_ANALYZER: &str = "tidemark_words";
/// Longest `_id` Elasticsearch accepts, in bytes; longer ids are hashed.
const MAX_ID_BYTES: usize = 512;

/// `elasticsearch.index`: a name, or a pattern with strftime fields of the window start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexName {
    raw: String,
    dated: bool,
}

/// strftime fields an index name may use: digits only, at most hourly.
const DATE_FIELDS: &[char] = &['Y', 'C', 'y', 'm', 'd', 'H', 'j', 'G', 'g', 'V', 'U', 'W', 'u', 'w', '%'];

impl IndexName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars().peekable();
        let mut dated = false;
        while let Some(c) = chars.next() {
            if c == '%' {
                match chars.next() {
                    Some(field) if DATE_FIELDS.contains(&field) => dated |= field != '%',
                    other => return Err(format!("unsupported date field %{}", other.unwrap_or(' '))),
                }
            }
        }
        let name = Self { raw: raw.to_string(), dated };
        // Render one name and check it against Elasticsearch's index-name rules.
        let sample = name.for_window(1_700_000_000_000);
        let valid = !sample.is_empty()
            && sample.len() <= 255
            && !sample.starts_with(['-', '_', '+'])
            && sample != "."
            && sample != ".."
            && !sample.chars().any(|c| c.is_uppercase() || " \\/*?\"<>|,#:".contains(c));
        if valid { Ok(name) } else { Err(format!("{raw:?} is not a valid index name")) }
    }

    /// The index a window starting at `window_start_ms` goes to.
    pub fn for_window(&self, window_start_ms: i64) -> Cow<'_, str> {
        if !self.dated {
            return if self.raw.contains('%') {
                Cow::Owned(self.raw.replace("%%", "%"))
            } else {
                Cow::Borrowed(&self.raw)
            };
        }
        let time = chrono::DateTime::from_timestamp_millis(window_start_ms).unwrap_or_default();
        Cow::Owned(time.format(&self.raw).to_string())
    }

    /// The indices a search covers (and the template's pattern).
    pub fn pattern(&self) -> String {
        match self.raw.find('%') {
            Some(at) if self.dated => format!("{}*", &self.raw[..at]),
            _ => self.raw.replace("%%", "%"),
        }
    }
}

/// The document `_id` of a window.
pub fn document_id(result: &WindowResult) -> String {
    let id = format!("{}|{}|{}", result.sensor_id, result.event_type, result.window_start_ms);
    if id.len() <= MAX_ID_BYTES { id } else { format!("sha256:{}", hex::encode(sha2::Sha256::digest(id.as_bytes()))) }
}

/// The numeric `id` of a document (the item shape of `/api/predictions` has one): the
/// first 53 bits of the SHA-256 of its `_id`, exact in JavaScript, the same on every
/// replay. Cursors pair it with the window start.
pub fn numeric_id(document_id: &str) -> i64 {
    let digest = sha2::Sha256::digest(document_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) & ((1 << 53) - 1)) as i64
}

/// A window result as indexed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    id: i64,
    #[serde(flatten)]
    record: ResultRecord<'a>,
    created_at: &'a str,
    updated_at: &'a str,
}

/// The `_source` of a search hit.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Source {
    id: i64,
    sensor_id: String,
    event_type: String,
    window_start: String,
    window_end: String,
    event_count: i64,
    avg_value: f64,
    min_value: f64,
    max_value: f64,
    stddev: f64,
    prediction_score: f64,
    anomaly: bool,
    severity: String,
    revision: i64,
    #[serde(default)]
    explanation: String,
    #[serde(default)]
    window_kind: Option<String>,
    created_at: String,
    updated_at: String,
}

fn parse_time(text: &str) -> Result<i64, StoreError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.timestamp_millis())
        .map_err(|error| StoreError::Internal(format!("elasticsearch returned a date {text:?}: {error}")))
}

impl TryFrom<Source> for Prediction {
    type Error = StoreError;

    fn try_from(source: Source) -> Result<Self, StoreError> {
        Ok(Prediction {
            id: source.id,
            sensor_id: source.sensor_id,
            event_type: source.event_type,
            window_start: parse_time(&source.window_start)?,
            window_end: parse_time(&source.window_end)?,
            event_count: source.event_count,
            avg_value: source.avg_value,
            min_value: source.min_value,
            max_value: source.max_value,
            stddev: source.stddev,
            prediction_score: source.prediction_score,
            anomaly: source.anomaly,
            severity: source.severity,
            revision: source.revision,
            explanation: source.explanation,
            window_kind: source.window_kind.unwrap_or_else(|| "tumbling".to_string()),
            created_at: parse_time(&source.created_at)?,
            updated_at: parse_time(&source.updated_at)?,
        })
    }
}

/// One bulk request body (NDJSON: an `index` action and the document per result).
pub struct BulkBody {
    pub bytes: Vec<u8>,
    /// Index of each item's result in the slice it was encoded from.
    pub items: usize,
}

/// Encode `results` as `index` operations; `now` stamps `createdAt`/`updatedAt`.
pub fn encode_bulk(index: &IndexName, results: &[&WindowResult], now_ms: i64) -> Result<BulkBody, serde_json::Error> {
    let now = crate::store::ser::rfc3339(now_ms);
    let mut bytes = Vec::with_capacity(results.len() * 560);
    let mut last_index: Option<(i64, String)> = None;
    for result in results {
        // Dated index names change at most hourly: render once per hour seen.
        let hour = result.window_start_ms.div_euclid(3_600_000);
        let index_name = match &last_index {
            Some((cached, name)) if *cached == hour => name.clone(),
            _ => {
                let name = index.for_window(result.window_start_ms).into_owned();
                last_index = Some((hour, name.clone()));
                name
            }
        };
        let id = document_id(result);
        serde_json::to_writer(&mut bytes, &json!({"index": {"_index": index_name, "_id": id}}))?;
        bytes.push(b'\n');
        let document =
            Document { id: numeric_id(&id), record: ResultRecord::from(*result), created_at: &now, updated_at: &now };
        serde_json::to_writer(&mut bytes, &document)?;
        bytes.push(b'\n');
    }
    Ok(BulkBody { bytes, items: results.len() })
}

/// What became of one bulk item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemOutcome {
    Indexed,
    /// 429 or 5xx: send it again.
    Retry(String),
    /// Refused for its content (e.g. `mapper_parsing_exception`): a dead letter.
    Rejected(String),
}

/// Why a bulk request as a whole failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// Connection error, timeout, 429, 5xx, 401/403 (credentials can be fixed while we
    /// wait): send the same request again later.
    #[error("{0}")]
    Retriable(String),
    /// The request was refused as a whole (400, 413): split it to find the culprit.
    #[error("{0}")]
    Refused(String),
}

#[derive(Deserialize)]
struct BulkReply {
    errors: bool,
    items: Vec<std::collections::HashMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<Value>,
}

/// Read a `_bulk` response item by item (`items` in request order).
pub fn parse_bulk_reply(body: &[u8], expected: usize) -> Result<Vec<ItemOutcome>, String> {
    #[derive(Deserialize)]
    struct Quick {
        errors: bool,
        items: Vec<serde::de::IgnoredAny>,
    }
    let quick: Quick = serde_json::from_slice(body).map_err(|error| format!("unreadable _bulk response: {error}"))?;
    if quick.items.len() != expected {
        return Err(format!("_bulk answered {} items for {expected}", quick.items.len()));
    }
    if !quick.errors {
        return Ok(vec![ItemOutcome::Indexed; expected]);
    }
    let reply: BulkReply =
        serde_json::from_slice(body).map_err(|error| format!("unreadable _bulk response: {error}"))?;
    debug_assert!(reply.errors);
    Ok(reply
        .items
        .into_iter()
        .map(|mut item| {
            let Some((_, item)) = item.drain().next() else {
                return ItemOutcome::Retry("empty bulk item".into());
            };
            match item.status {
                200..=299 => ItemOutcome::Indexed,
                status => {
                    let reason = item
                        .error
                        .map(|error| match (error["type"].as_str(), error["reason"].as_str()) {
                            (Some(kind), Some(reason)) => format!("{kind}: {reason}"),
                            _ => error.to_string(),
                        })
                        .unwrap_or_else(|| format!("status {status}"));
                    if status == 429 || status >= 500 {
                        ItemOutcome::Retry(format!("{status} {reason}"))
                    } else {
                        ItemOutcome::Rejected(format!("elasticsearch refused the document ({status}): {reason}"))
                    }
                }
            }
        })
        .collect())
}

/// The index template: explicit mapping, the words analyzer, `dynamic: strict`.
pub fn index_template(config: &ElasticsearchConfig, pattern: &str) -> Value {
    let keyword = json!({"type": "keyword", "copy_to": "searchText"});
    let date = json!({"type": "date", "format": "strict_date_optional_time||epoch_millis"});
    let double = json!({"type": "double"});
    json!({
        "index_patterns": [pattern],
        "priority": 200,
        "_meta": {"managed_by": "tidemark", "version": 2},
        "template": {
            "settings": {
                "number_of_shards": config.number_of_shards,
                "number_of_replicas": config.number_of_replicas,
                "analysis": {
                    "tokenizer": {WORDS_ANALYZER: {"type": "pattern", "pattern": "[^\\p{L}\\p{N}]+"}},
                    "analyzer": {WORDS_ANALYZER: {"type": "custom", "tokenizer": WORDS_ANALYZER, "filter": ["lowercase"]}},
                },
            },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "id": {"type": "long"},
                    "sensorId": keyword,
                    "eventType": keyword,
                    "severity": keyword,
                    "windowKind": {"type": "keyword"},
                    "supersedes": {"type": "date", "format": "epoch_millis"},
                    "windowStart": date,
                    "windowEnd": date,
                    "createdAt": date,
                    "updatedAt": date,
                    "eventCount": {"type": "long"},
                    "avgValue": double,
                    "minValue": double,
                    "maxValue": double,
                    "stddev": double,
                    "predictionScore": double,
                    "anomaly": {"type": "boolean"},
                    "revision": {"type": "integer"},
                    "explanation": {"type": "text", "analyzer": WORDS_ANALYZER, "copy_to": "searchText"},
                    "searchText": {"type": "text", "analyzer": WORDS_ANALYZER},
                },
            },
        },
    })
}

/// The cluster, as tidemark talks to it.
pub struct EsClient {
    client: Elasticsearch,
    pub index: IndexName,
    template: String,
    config: ElasticsearchConfig,
}

impl EsClient {
    pub fn new(config: &ElasticsearchConfig) -> Result<Self, String> {
        let urls = config
            .urls
            .iter()
            .map(|url| {
                reqwest::Url::parse(url)
                    .map_err(|error| format!("elasticsearch.urls: {}: {error}", crate::config::redact_url(url)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pool = MultiNodeConnectionPool::round_robin(urls, None);
        let mut builder = TransportBuilder::new(pool).timeout(config.request_timeout).disable_proxy();
        if !config.api_key.is_empty() {
            builder = builder.auth(Credentials::EncodedApiKey(config.api_key.clone()));
        } else if !config.username.is_empty() {
            builder = builder.auth(Credentials::Basic(config.username.clone(), config.password.clone()));
        }
        if !config.ca_file.is_empty() {
            let pem = std::fs::read(&config.ca_file)
                .map_err(|error| format!("elasticsearch.ca_file {}: {error}", config.ca_file))?;
            let certificate = Certificate::from_pem(&pem)
                .map_err(|error| format!("elasticsearch.ca_file {}: {error}", config.ca_file))?;
            builder = builder.cert_validation(CertificateValidation::Full(certificate));
        }
        let transport = builder.build().map_err(|error| format!("elasticsearch client: {error}"))?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            index: IndexName::parse(&config.index)?,
            template: config.template.clone(),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ElasticsearchConfig {
        &self.config
    }

    async fn request(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<(StatusCode, Bytes), String> {
        let mut headers = HeaderMap::new();
        if body.is_some() {
            headers.insert(
                elasticsearch::http::headers::CONTENT_TYPE,
                elasticsearch::http::headers::HeaderValue::from_static("application/json"),
            );
        }
        let response = self
            .client
            .send(method, path, headers, Option::<&()>::None, body, None)
            .await
            .map_err(|error| format!("elasticsearch unreachable: {error}"))?;
        let status = response.status_code();
        let bytes = response.bytes().await.map_err(|error| format!("elasticsearch answer cut off: {error}"))?;
        Ok((status, bytes))
    }

    /// Apply the index template (when `elasticsearch.template` names one).
    pub async fn apply_template(&self) -> Result<(), BulkError> {
        if self.template.is_empty() {
            return Ok(());
        }
        let body = index_template(&self.config, &self.index.pattern());
        let path = format!("_index_template/{}", self.template);
        let (status, reply) = self
            .request(Method::Put, &path, Some(Bytes::from(body.to_string())))
            .await
            .map_err(BulkError::Retriable)?;
        classify(status, &reply).map(|_| ())
    }

    /// Whether the index template exists (`GET _index_template/{name}`).
    pub async fn template_exists(&self) -> Result<bool, String> {
        let (status, reply) = self.request(Method::Get, &format!("_index_template/{}", self.template), None).await?;
        match status.as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(format!("_index_template answered {status}: {}", String::from_utf8_lossy(&reply))),
        }
    }

    /// Cluster health (`green`, `yellow`, `red`).
    pub async fn health(&self) -> Result<String, String> {
        let (status, reply) = self.request(Method::Get, "_cluster/health", None).await?;
        if !status.is_success() {
            return Err(format!("_cluster/health answered {status}: {}", String::from_utf8_lossy(&reply)));
        }
        let health: Value = serde_json::from_slice(&reply).map_err(|error| error.to_string())?;
        Ok(health["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Send one bulk body; the outcome of each item, in order.
    pub async fn bulk(&self, body: BulkBody) -> Result<Vec<ItemOutcome>, BulkError> {
        let expected = body.items;
        let (status, reply) =
            self.request(Method::Post, "_bulk", Some(Bytes::from(body.bytes))).await.map_err(BulkError::Retriable)?;
        classify(status, &reply)?;
        parse_bulk_reply(&reply, expected).map_err(BulkError::Retriable)
    }

    async fn search_body(&self, body: &Value) -> Result<Value, StoreError> {
        let pattern = self.index.pattern();
        let response = self
            .client
            .search(SearchParts::Index(&[&pattern]))
            .ignore_unavailable(true)
            .allow_no_indices(true)
            .body(body)
            .send()
            .await
            .map_err(|error| StoreError::Unavailable(format!("elasticsearch unreachable: {error}")))?;
        let status = response.status_code();
        let reply = response
            .bytes()
            .await
            .map_err(|error| StoreError::Unavailable(format!("elasticsearch answer cut off: {error}")))?;
        if status == StatusCode::NOT_FOUND {
            return Ok(json!({"hits": {"hits": []}, "aggregations": {}}));
        }
        classify(status, &reply).map_err(|error| match error {
            BulkError::Retriable(message) => StoreError::Unavailable(message),
            BulkError::Refused(message) => StoreError::Internal(format!("search refused: {message}")),
        })?;
        serde_json::from_slice(&reply)
            .map_err(|error| StoreError::Internal(format!("unreadable search answer: {error}")))
    }
}

fn classify(status: StatusCode, reply: &[u8]) -> Result<(), BulkError> {
    let code = status.as_u16();
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&reply[..reply.len().min(2048)]).into_owned();
    let message = format!("elasticsearch answered {code}: {text}");
    if code == 429 || code >= 500 || code == 401 || code == 403 || code == 408 {
        Err(BulkError::Retriable(message))
    } else {
        Err(BulkError::Refused(message))
    }
}

/// A term as a `match_phrase` (or `match_phrase_prefix`) over `searchText`.
fn phrase(term: &Term) -> Value {
    let kind = if term.prefix { "match_phrase_prefix" } else { "match_phrase" };
    json!({kind: {"searchText": {"query": term.words.join(" ")}}})
}

/// The bool query of a prediction query's filters and text.
pub fn bool_query(query: &PredictionQuery) -> Value {
    let mut filter = Vec::new();
    if let Some(sensor_id) = &query.sensor_id {
        filter.push(json!({"term": {"sensorId": sensor_id}}));
    }
    if let Some(event_type) = &query.event_type {
        filter.push(json!({"term": {"eventType": event_type}}));
    }
    if query.from_ms.is_some() || query.to_ms.is_some() {
        let mut range = serde_json::Map::new();
        if let Some(from) = query.from_ms {
            range.insert("gte".into(), json!(from));
        }
        if let Some(to) = query.to_ms {
            range.insert("lt".into(), json!(to));
        }
        range.insert("format".into(), json!("epoch_millis"));
        filter.push(json!({"range": {"windowStart": range}}));
    }
    if let Some(anomaly) = query.anomaly {
        filter.push(json!({"term": {"anomaly": anomaly}}));
    }
    if !query.severities.is_empty() {
        let names: Vec<&str> = query.severities.iter().map(|severity| severity.as_str()).collect();
        filter.push(json!({"terms": {"severity": names}}));
    }
    let (must, must_not): (Vec<Value>, Vec<Value>) = match &query.text {
        Some(text) => (text.positive().map(phrase).collect(), text.negative().map(phrase).collect()),
        None => (Vec::new(), Vec::new()),
    };
    json!({"bool": {"filter": filter, "must": must, "must_not": must_not}})
}

/// The `_search` body of a page of `/api/search`.
pub fn search_request(query: &PredictionQuery) -> Value {
    let mut body = json!({
        "size": query.limit + 1,
        "track_total_hits": false,
        "query": bool_query(query),
        "sort": [{"windowStart": {"order": "desc"}}, {"id": {"order": "desc"}}],
    });
    if let Some(cursor) = query.cursor {
        body["search_after"] = json!([cursor.window_start_ms, cursor.id]);
    }
    body
}

/// The `_search` body of `/api/search/histogram`.
pub fn histogram_request(query: &HistogramQuery) -> Value {
    json!({
        "size": 0,
        "track_total_hits": false,
        "query": bool_query(&query.query),
        "aggs": {
            "intervals": {
                "date_histogram": {"field": "windowStart", "fixed_interval": format!("{}ms", query.interval_ms), "min_doc_count": 1},
                "aggs": {
                    "types": {
                        "terms": {"field": "eventType", "size": 1000, "order": {"_key": "asc"}},
                        "aggs": {"anomalies": {"filter": {"term": {"anomaly": true}}}},
                    },
                },
            },
        },
    })
}

#[async_trait]
impl SearchBackend for EsClient {
    fn name(&self) -> &'static str {
        "elasticsearch"
    }

    async fn search(&self, query: &PredictionQuery) -> Result<Page<Prediction>, StoreError> {
        let reply = self.search_body(&search_request(query)).await?;
        let hits = reply["hits"]["hits"].as_array().cloned().unwrap_or_default();
        let mut items = Vec::with_capacity(hits.len());
        for mut hit in hits {
            let source: Source = serde_json::from_value(hit["_source"].take())
                .map_err(|error| StoreError::Internal(format!("unexpected document in elasticsearch: {error}")))?;
            items.push(Prediction::try_from(source)?);
        }
        Ok(crate::store::paginate(items, query.limit))
    }

    async fn histogram(&self, query: &HistogramQuery) -> Result<Vec<HistogramBucket>, StoreError> {
        let reply = self.search_body(&histogram_request(query)).await?;
        let mut buckets = Vec::new();
        for interval in reply["aggregations"]["intervals"]["buckets"].as_array().into_iter().flatten() {
            let start = interval["key"].as_i64().unwrap_or_default();
            for kind in interval["types"]["buckets"].as_array().into_iter().flatten() {
                buckets.push(HistogramBucket {
                    start,
                    event_type: kind["key"].as_str().unwrap_or_default().to_string(),
                    windows: kind["doc_count"].as_i64().unwrap_or_default(),
                    anomalies: kind["anomalies"]["doc_count"].as_i64().unwrap_or_default(),
                });
            }
            if buckets.len() > MAX_BUCKETS {
                break;
            }
        }
        Ok(buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names() {
        let daily = IndexName::parse("tidemark-predictions-%Y.%m.%d").unwrap();
        assert_eq!(daily.for_window(1_700_000_000_000), "tidemark-predictions-2023.11.14");
        assert_eq!(daily.pattern(), "tidemark-predictions-*");
        let plain = IndexName::parse("tidemark-predictions").unwrap();
        assert_eq!(plain.pattern(), "tidemark-predictions");
        assert!(IndexName::parse("Tidemark").is_err());
        assert!(IndexName::parse("a b").is_err());
        assert!(IndexName::parse("x-%M").is_err());
        assert!(IndexName::parse("_x").is_err());
    }

    #[test]
    fn bulk_items_are_read_one_by_one() {
        let reply = br#"{"took":3,"errors":true,"items":[
            {"index":{"_index":"i","_id":"a","status":201,"result":"created"}},
            {"index":{"_index":"i","_id":"b","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [avgValue]"}}},
            {"index":{"_index":"i","_id":"c","status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}}]}"#;
        let outcomes = parse_bulk_reply(reply, 3).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Indexed);
        assert!(matches!(&outcomes[1], ItemOutcome::Rejected(r) if r.contains("mapper_parsing_exception")));
        assert!(matches!(&outcomes[2], ItemOutcome::Retry(r) if r.starts_with("429")));
        assert!(parse_bulk_reply(reply, 2).is_err());
    }
}
