//! A protocol-level stand-in for Elasticsearch (Elasticsearch cannot run on the machines
//! tidemark is tested on). It speaks the REST API tidemark uses, following Elasticsearch's
//! REST API documentation for request and response shapes, and refuses what a real
//! cluster refuses:
//!
//! - `GET /`, `GET /_cluster/health`;
//! - `PUT|GET /_index_template/{name}` (composable templates: `index_patterns`,
//!   `template.settings`, `template.mappings`; an index is created from the template
//!   of highest priority whose pattern matches, on first write);
//! - `POST|PUT /_bulk`, `/{index}/_bulk`: NDJSON terminated by a newline, `index`,
//!   `create` and `delete` actions, per-item results (`created`/`updated`, status,
//!   `_version`, `_seq_no`), documents checked against the mapping (`dynamic: strict`,
//!   field types) with per-item `strict_dynamic_mapping_exception` and
//!   `document_parsing_exception` errors;
//! - `GET|POST /{index}/_search`, `/_search`, `/{index}/_count`: `bool`
//!   (`filter`/`must`/`must_not`/`should`), `term`, `terms`, `range`, `match_phrase`,
//!   `match_phrase_prefix`, `match_all`, `exists`; `sort`, `search_after`, `size`,
//!   `from`; `date_histogram` (`fixed_interval`), `terms` and `filter` aggregations;
//!   unknown keys and query types are a 400 `parsing_exception`, as in Elasticsearch;
//! - near-real-time visibility: a document is searchable after the next refresh (every
//!   second, `?refresh`, or `POST /{index}/_refresh`).
//!
//! Text fields are analysed with the analyzer their mapping names: a `pattern` tokenizer
//! with a `lowercase` filter (what tidemark's template defines) or `standard`
//! (approximated by the same rule). `copy_to` fields hold each source value with a
//! position gap of 100, so phrases do not match across values.
//!
//! Faults are injected through [`Faults`] (in process) or `POST /_double/faults`: items
//! refused for their content, 429 items, 429 and 503 answers, connection resets before
//! and after a bulk request is applied, slow answers, and the node down (listener
//! closed: connection refused) for a while (`POST /_double/down?seconds=N`).
//! `GET /_double/stats` counts requests,
//! documents and shape violations (requests a real cluster would refuse as malformed).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

/// Injected faults; counters count down as they fire.
#[derive(Debug, Default)]
pub struct Faults {
    /// Items whose `sensorId` contains this are refused (`document_parsing_exception`).
    pub reject_sensor_containing: Mutex<Option<String>>,
    /// Every n-th bulk item is answered 429 (0: never).
    pub item_429_every: AtomicU32,
    /// The next n requests are answered 429 as a whole.
    pub http_429_next: AtomicU32,
    /// The next n requests are answered 503 as a whole.
    pub http_503_next: AtomicU32,
    /// The next n connections are reset before a request is read.
    pub reset_next: AtomicU32,
    /// The next n bulk requests are applied and their connection reset before the answer.
    pub reset_after_apply_next: AtomicU32,
    /// Every answer waits this long.
    pub delay_ms: AtomicU64,
    /// Requests without exactly this `Authorization` header get 401 (security enabled).
    pub required_authorization: Mutex<Option<String>>,
}

/// `POST /_double/faults`: the fields of [`Faults`], camelCase.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct FaultSettings {
    reject_sensor_containing: Option<String>,
    item_429_every: u32,
    http_429_next: u32,
    http_503_next: u32,
    reset_next: u32,
    reset_after_apply_next: u32,
    delay_ms: u64,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub requests: u64,
    pub bulk_requests: u64,
    pub bulk_items: u64,
    pub search_requests: u64,
    /// Requests refused because their shape is not what Elasticsearch documents.
    pub violations: Vec<String>,
}

#[derive(Clone, Debug)]
struct Document {
    source: Value,
    version: u64,
    visible_from: Instant,
}

#[derive(Debug, Default)]
struct Index {
    /// `mappings.properties` and `dynamic` of the template it was created from.
    properties: Map<String, Value>,
    dynamic_strict: bool,
    /// Field → analyzer name → (uses the pattern/lowercase rule).
    docs: BTreeMap<String, Document>,
    next_seq_no: u64,
}

#[derive(Default)]
struct Cluster {
    templates: BTreeMap<String, Value>,
    indices: BTreeMap<String, Index>,
    stats: Stats,
}

/// The stand-in. Cloning shares it.
#[derive(Clone)]
pub struct EsDouble {
    cluster: Arc<Mutex<Cluster>>,
    pub faults: Arc<Faults>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub addr: SocketAddr,
}

/// How often documents become visible without an explicit refresh.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl EsDouble {
    /// Listen on `addr` (port 0: any free port) and serve until the runtime stops.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, None).await
    }

    /// [`EsDouble::start`] serving HTTPS with `tls`.
    pub async fn start_tls(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        Self::start_with(addr, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let double = Self {
            cluster: Arc::new(Mutex::new(Cluster::default())),
            faults: Arc::new(Faults::default()),
            down: Arc::new(tokio::sync::watch::Sender::new(false)),
            tls,
            addr,
        };
        tokio::spawn(double.clone().serve(listener));
        Ok(double)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Close the listener (connections are refused) until [`EsDouble::set_up`].
    pub fn set_down(&self) {
        self.down.send_replace(true);
    }

    pub fn set_up(&self) {
        self.down.send_replace(false);
    }

    async fn serve(self, listener: TcpListener) {
        let mut listener = Some(listener);
        let mut down = self.down_rx();
        loop {
            if *down.borrow_and_update() {
                // The node is down: no listener (connections are refused), and every open
                // connection was cut (each connection task watches the same flag).
                listener = None;
                if down.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let active = match &listener {
                Some(listener) => listener,
                None => {
                    match TcpListener::bind(self.addr).await {
                        Ok(bound) => listener = Some(bound),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    continue;
                }
            };
            let accepted = tokio::select! {
                accepted = active.accept() => accepted,
                changed = down.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Ok((stream, _)) = accepted else { continue };
            if take_one(&self.faults.reset_next) {
                // SO_LINGER 0: the close sends a reset (and does not block).
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let app = self.router();
            let cut = self.down_rx();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, app, cut).await,
                    Some(tls) => {
                        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(5), tls.accept(stream)).await {
                            serve_connection(stream, app, cut).await;
                        }
                    }
                }
            });
        }
    }

    async fn check_authorization(
        State(double): State<EsDouble>,
        request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> Response {
        let required = double.faults.required_authorization.lock().clone();
        if let Some(required) = required {
            let given = request.headers().get("authorization").and_then(|v| v.to_str().ok());
            if given != Some(required.as_str()) {
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "security_exception",
                    "missing authentication credentials for REST request",
                );
                response.headers_mut().insert(
                    "www-authenticate",
                    axum::http::HeaderValue::from_static("Basic realm=\"security\", charset=\"UTF-8\", ApiKey"),
                );
                return response;
            }
        }
        next.run(request).await
    }

    fn down_rx(&self) -> tokio::sync::watch::Receiver<bool> {
        self.down.subscribe()
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/", get(info))
            .route("/_cluster/health", get(health))
            .route("/_index_template/{name}", any(index_template))
            .route("/_bulk", any(bulk_all))
            .route("/{index}/_bulk", any(bulk_index))
            .route("/_search", any(search_all))
            .route("/{index}/_search", any(search_index))
            .route("/{index}/_count", any(count_index))
            .route("/_refresh", any(refresh_all))
            .route("/{index}/_refresh", any(refresh_index))
            .route("/_double/faults", any(set_faults))
            .route("/_double/stats", get(stats))
            .route("/_double/down", any(down_for))
            .fallback(unknown)
            // Elasticsearch's http.max_content_length default.
            .layer(axum::extract::DefaultBodyLimit::max(100 << 20))
            .layer(axum::middleware::from_fn_with_state(self.clone(), Self::check_authorization))
            .with_state(self.clone())
    }

    /// Every visible document of the indices `pattern` names, with its index and id.
    pub fn documents(&self, pattern: &str) -> Vec<(String, String, Value)> {
        let cluster = self.cluster.lock();
        let mut out = Vec::new();
        for (name, index) in &cluster.indices {
            if matches_expression(pattern, name) {
                for (id, doc) in &index.docs {
                    out.push((name.clone(), id.clone(), doc.source.clone()));
                }
            }
        }
        out
    }

    pub fn stats(&self) -> Value {
        serde_json::to_value(&self.cluster.lock().stats).unwrap_or_default()
    }

    pub fn violations(&self) -> Vec<String> {
        self.cluster.lock().stats.violations.clone()
    }

    pub fn template(&self, name: &str) -> Option<Value> {
        self.cluster.lock().templates.get(name).cloned()
    }

    /// Make every document searchable now.
    pub fn refresh(&self) {
        let now = Instant::now();
        for index in self.cluster.lock().indices.values_mut() {
            for doc in index.docs.values_mut() {
                doc.visible_from = doc.visible_from.min(now);
            }
        }
    }

    async fn before_answer(&self) -> Option<Response> {
        let delay = self.faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.cluster.lock().stats.requests += 1;
        if take_one(&self.faults.http_429_next) {
            return Some(error(
                StatusCode::TOO_MANY_REQUESTS,
                "es_rejected_execution_exception",
                "rejected execution of coordinating operation",
            ));
        }
        if take_one(&self.faults.http_503_next) {
            return Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_block_exception",
                "blocked by: [SERVICE_UNAVAILABLE/2/no master];",
            ));
        }
        None
    }

    fn violation(&self, status: StatusCode, kind: &str, reason: String) -> Response {
        self.cluster.lock().stats.violations.push(format!("{kind}: {reason}"));
        error(status, kind, &reason)
    }
}

/// One HTTP/1.1 connection, cut when the node goes down.
async fn serve_connection<I>(io: I, app: Router, mut cut: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = connection => {}
        _ = cut.wait_for(|down| *down) => {}
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

fn error(status: StatusCode, kind: &str, reason: &str) -> Response {
    let cause = json!({"type": kind, "reason": reason});
    (status, axum::Json(json!({"error": {"root_cause": [cause.clone()], "type": kind, "reason": reason}, "status": status.as_u16()})))
        .into_response()
}

async fn info(State(double): State<EsDouble>) -> Response {
    if let Some(fault) = double.before_answer().await {
        return fault;
    }
    axum::Json(json!({
        "name": "tidemark-es-double",
        "cluster_name": "tidemark-test",
        "cluster_uuid": "tidemark-es-double",
        "version": {"number": "8.15.0", "build_flavor": "default", "lucene_version": "9.11.1",
                    "minimum_wire_compatibility_version": "7.17.0", "minimum_index_compatibility_version": "7.0.0"},
        "tagline": "You Know, for Search",
    }))
    .into_response()
}

async fn health(State(double): State<EsDouble>) -> Response {
    if let Some(fault) = double.before_answer().await {
        return fault;
    }
    let indices = double.cluster.lock().indices.len();
    axum::Json(json!({
        "cluster_name": "tidemark-test", "status": "green", "timed_out": false,
        "number_of_nodes": 1, "number_of_data_nodes": 1, "active_primary_shards": indices,
        "active_shards": indices, "relocating_shards": 0, "initializing_shards": 0, "unassigned_shards": 0,
        "delayed_unassigned_shards": 0, "number_of_pending_tasks": 0, "number_of_in_flight_fetch": 0,
        "task_max_waiting_in_queue_millis": 0, "active_shards_percent_as_number": 100.0,
    }))
    .into_response()
}

async fn unknown(State(double): State<EsDouble>, method: Method, uri: axum::http::Uri) -> Response {
    double.violation(
        StatusCode::BAD_REQUEST,
        "illegal_argument_exception",
        format!("request [{method} {}] is not handled by the stand-in (and may not exist)", uri.path()),
    )
}

const TEMPLATE_KEYS: &[&str] = &[
    "index_patterns",
    "template",
    "priority",
    "version",
    "_meta",
    "composed_of",
    "data_stream",
    "allow_auto_create",
    "ignore_missing_component_templates",
    "deprecated",
];
const FIELD_TYPES: &[&str] = &["keyword", "text", "date", "double", "float", "long", "integer", "short", "boolean"];

async fn index_template(
    State(double): State<EsDouble>,
    Path(name): Path<String>,
    method: Method,
    body: Bytes,
) -> Response {
    if let Some(fault) = double.before_answer().await {
        return fault;
    }
    match method {
        Method::GET => match double.template(&name) {
            Some(template) => {
                axum::Json(json!({"index_templates": [{"name": name, "index_template": template}]})).into_response()
            }
            None => error(
                StatusCode::NOT_FOUND,
                "resource_not_found_exception",
                &format!("index template matching [{name}] not found"),
            ),
        },
        Method::PUT | Method::POST => {
            let template: Value = match serde_json::from_slice(&body) {
                Ok(Value::Object(object)) => Value::Object(object),
                _ => {
                    return double.violation(
                        StatusCode::BAD_REQUEST,
                        "parse_exception",
                        "request body is required and must be a JSON object".into(),
                    );
                }
            };
            for key in template.as_object().into_iter().flatten().map(|(key, _)| key) {
                if !TEMPLATE_KEYS.contains(&key.as_str()) {
                    return double.violation(
                        StatusCode::BAD_REQUEST,
                        "x_content_parse_exception",
                        format!("[index_template] unknown field [{key}]"),
                    );
                }
            }
            let patterns_ok = match &template["index_patterns"] {
                Value::String(_) => true,
                Value::Array(items) => !items.is_empty() && items.iter().all(Value::is_string),
                _ => false,
            };
            if !patterns_ok {
                return double.violation(
                    StatusCode::BAD_REQUEST,
                    "action_request_validation_exception",
                    "Validation Failed: 1: index patterns are missing;".into(),
                );
            }
            for key in template["template"].as_object().into_iter().flatten().map(|(key, _)| key) {
                if !["settings", "mappings", "aliases", "lifecycle"].contains(&key.as_str()) {
                    return double.violation(
                        StatusCode::BAD_REQUEST,
                        "x_content_parse_exception",
                        format!("[template] unknown field [{key}]"),
                    );
                }
            }
            for (field, mapping) in template["template"]["mappings"]["properties"].as_object().into_iter().flatten() {
                let kind = mapping["type"].as_str().unwrap_or("object");
                if !FIELD_TYPES.contains(&kind) {
                    return double.violation(
                        StatusCode::BAD_REQUEST,
                        "mapper_parsing_exception",
                        format!("No handler for type [{kind}] declared on field [{field}]"),
                    );
                }
            }
            double.cluster.lock().templates.insert(name, template);
            axum::Json(json!({"acknowledged": true})).into_response()
        }
        Method::DELETE => {
            double.cluster.lock().templates.remove(&name);
            axum::Json(json!({"acknowledged": true})).into_response()
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "illegal_argument_exception", "method not allowed"),
    }
}

/// `*` wildcards and comma lists, as index expressions.
fn matches_expression(expression: &str, name: &str) -> bool {
    expression.split(',').any(|part| {
        let part = part.trim();
        part == "_all" || wildcard(part, name)
    })
}

fn wildcard(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|skip| {
                    let rest = &text[head.len() + skip..];
                    text.is_char_boundary(head.len() + skip) && wildcard(tail, rest)
                })
        }
    }
}

fn valid_index_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['-', '_', '+'])
        && !name.chars().any(|c| c.is_uppercase() || " \\/*?\"<>|,#:".contains(c))
}

impl Cluster {
    /// The index, created from the best matching template on first write.
    fn index_for_write(&mut self, name: &str) -> &mut Index {
        if !self.indices.contains_key(name) {
            let template = self
                .templates
                .values()
                .filter(|template| {
                    let patterns: Vec<&str> = match &template["index_patterns"] {
                        Value::String(pattern) => vec![pattern.as_str()],
                        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
                        _ => Vec::new(),
                    };
                    patterns.iter().any(|pattern| wildcard(pattern, name))
                })
                .max_by_key(|template| template["priority"].as_i64().unwrap_or(0));
            let mappings = template.map(|template| template["template"]["mappings"].clone()).unwrap_or(Value::Null);
            self.indices.insert(
                name.to_string(),
                Index {
                    properties: mappings["properties"].as_object().cloned().unwrap_or_default(),
                    dynamic_strict: mappings["dynamic"].as_str() == Some("strict")
                        || mappings["dynamic"] == json!(false),
                    ..Index::default()
                },
            );
        }
        self.indices.entry(name.to_string()).or_default()
    }
}

/// Check a document against the mapping: the error a real cluster gives, if any.
fn check_document(index: &Index, id: &str, source: &Value) -> Option<(String, String)> {
    let Value::Object(fields) = source else {
        return Some(("document_parsing_exception".into(), "[1:1] failed to parse: source is not an object".into()));
    };
    for (field, value) in fields {
        let Some(mapping) = index.properties.get(field) else {
            if index.dynamic_strict {
                return Some((
                    "strict_dynamic_mapping_exception".into(),
                    format!(
                        "[1:2] mapping set to strict, dynamic introduction of [{field}] within [_doc] is not allowed"
                    ),
                ));
            }
            continue;
        };
        let kind = mapping["type"].as_str().unwrap_or("object");
        let ok = match (kind, value) {
            (_, Value::Null) => true,
            ("keyword" | "text", Value::String(_)) => true,
            ("keyword" | "text", Value::Number(_) | Value::Bool(_)) => true,
            ("double" | "float", Value::Number(_)) => true,
            ("long" | "integer" | "short", Value::Number(n)) => n.is_i64() || n.is_u64(),
            ("boolean", Value::Bool(_)) => true,
            ("boolean", Value::String(s)) => s == "true" || s == "false",
            ("date", Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s).is_ok() || s.parse::<i64>().is_ok(),
            ("date", Value::Number(n)) => n.is_i64(),
            _ => false,
        };
        if !ok {
            let preview: String = value.to_string().chars().take(20).collect();
            return Some((
                "document_parsing_exception".into(),
                format!(
                    "[1:2] failed to parse field [{field}] of type [{kind}] in document with id '{id}'. Preview of field's value: '{preview}'"
                ),
            ));
        }
    }
    None
}

#[derive(Deserialize, Default)]
struct BulkParams {
    refresh: Option<String>,
}

async fn bulk_all(
    State(double): State<EsDouble>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    bulk(double, None, headers, query, body).await
}

async fn bulk_index(
    State(double): State<EsDouble>,
    Path(index): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    bulk(double, Some(index), headers, query, body).await
}

const ACTION_KEYS: &[&str] = &[
    "_index",
    "_id",
    "routing",
    "version",
    "version_type",
    "if_seq_no",
    "if_primary_term",
    "pipeline",
    "require_alias",
    "dynamic_templates",
];

async fn bulk(
    double: EsDouble,
    path_index: Option<String>,
    headers: HeaderMap,
    query: Option<String>,
    body: Bytes,
) -> Response {
    if let Some(fault) = double.before_answer().await {
        return fault;
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if ![
        "application/json",
        "application/x-ndjson",
        "application/vnd.elasticsearch+json",
        "application/vnd.elasticsearch+x-ndjson",
    ]
    .contains(&media)
    {
        return double.violation(
            StatusCode::NOT_ACCEPTABLE,
            "media_type_header_exception",
            format!("Content-Type header [{content_type}] is not supported"),
        );
    }
    let params: BulkParams = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let refresh_now = matches!(params.refresh.as_deref(), Some("" | "true" | "wait_for"));
    if body.is_empty() {
        return double.violation(StatusCode::BAD_REQUEST, "parse_exception", "request body is required".into());
    }
    if body.last() != Some(&b'\n') {
        return double.violation(
            StatusCode::BAD_REQUEST,
            "illegal_argument_exception",
            "The bulk request must be terminated by a newline [\\n]".into(),
        );
    }
    // Parse every line first: a malformed request is refused as a whole.
    let mut lines =
        body.split(|b| *b == b'\n').enumerate().filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace));
    let mut operations: Vec<(String, String, Option<String>, Option<Value>)> = Vec::new();
    while let Some((number, line)) = lines.next() {
        let action: Map<String, Value> = match serde_json::from_slice(line) {
            Ok(Value::Object(action)) if action.len() == 1 => action,
            _ => {
                return double.violation(
                    StatusCode::BAD_REQUEST,
                    "illegal_argument_exception",
                    format!("Malformed action/metadata line [{}], expected START_OBJECT or END_OBJECT", number + 1),
                );
            }
        };
        let Some((kind, meta)) = action.into_iter().next() else { continue };
        if !["index", "create", "delete", "update"].contains(&kind.as_str()) {
            return double.violation(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!("Malformed action/metadata line [{}], expected one of [create, delete, index, update] but found [{kind}]", number + 1),
            );
        }
        let Value::Object(meta) = meta else {
            return double.violation(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!("Malformed action/metadata line [{}]", number + 1),
            );
        };
        if let Some(key) = meta.keys().find(|key| !ACTION_KEYS.contains(&key.as_str())) {
            return double.violation(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!("Action/metadata line [{}] contains an unknown parameter [{key}]", number + 1),
            );
        }
        let index = meta.get("_index").and_then(Value::as_str).map(str::to_string).or_else(|| path_index.clone());
        let Some(index) = index else {
            return double.violation(
                StatusCode::BAD_REQUEST,
                "action_request_validation_exception",
                "Validation Failed: 1: index is missing;".into(),
            );
        };
        let id = meta.get("_id").and_then(Value::as_str).map(str::to_string);
        let source = if kind == "delete" {
            None
        } else {
            match lines.next() {
                Some((_, line)) => match serde_json::from_slice::<Value>(line) {
                    Ok(source) => Some(source),
                    Err(parse) => {
                        return double.violation(
                            StatusCode::BAD_REQUEST,
                            "x_content_parse_exception",
                            format!("[{}:1] {parse}", number + 2),
                        );
                    }
                },
                None => {
                    return double.violation(
                        StatusCode::BAD_REQUEST,
                        "action_request_validation_exception",
                        "Validation Failed: 1: source is missing;".into(),
                    );
                }
            }
        };
        if kind == "update" {
            return double.violation(
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                "update actions are not supported by the stand-in".into(),
            );
        }
        operations.push((kind, index, id, source));
    }
    let started = Instant::now();
    let item_429_every = double.faults.item_429_every.load(Ordering::Relaxed);
    let reject = double.faults.reject_sensor_containing.lock().clone();
    let mut errors = false;
    let mut items = ItemWriter::with_capacity(operations.len());
    {
        let mut cluster = double.cluster.lock();
        cluster.stats.bulk_requests += 1;
        cluster.stats.bulk_items += operations.len() as u64;
        let visible_from = if refresh_now { Instant::now() } else { next_refresh() };
        for (n, (kind, index_name, id, source)) in operations.into_iter().enumerate() {
            let fail = |status: u16, kind_name: &str, reason: &str, id: &Option<String>| {
                json!({"_index": index_name, "_id": id, "status": status,
                       "error": {"type": kind_name, "reason": reason, "index": index_name}})
            };
            if !valid_index_name(&index_name) {
                errors = true;
                items.push_value(&json!({kind.clone(): fail(400, "invalid_index_name_exception", &format!("Invalid index name [{index_name}]"), &id)}));
                continue;
            }
            if item_429_every > 0 && (n as u32 + 1).is_multiple_of(item_429_every) {
                errors = true;
                items.push_value(&json!({kind.clone(): fail(429, "es_rejected_execution_exception", "rejected execution of primary operation", &id)}));
                continue;
            }
            let doc_id = id.clone().unwrap_or_else(|| format!("auto-{}", cluster.stats.bulk_items + n as u64));
            if let (Some(needle), Some(source)) = (&reject, &source)
                && source["sensorId"].as_str().is_some_and(|sensor| sensor.contains(needle.as_str()))
            {
                errors = true;
                let reason = format!(
                    "[1:30] failed to parse field [sensorId] of type [keyword] in document with id '{doc_id}'. Preview of field's value: '{}'",
                    source["sensorId"].as_str().unwrap_or_default()
                );
                items.push_value(
                    &json!({kind.clone(): fail(400, "document_parsing_exception", &reason, &Some(doc_id))}),
                );
                continue;
            }
            let index = cluster.index_for_write(&index_name);
            if let Some(source) = &source
                && let Some((error_kind, reason)) = check_document(index, &doc_id, source)
            {
                errors = true;
                items.push_value(&json!({kind.clone(): fail(400, &error_kind, &reason, &Some(doc_id))}));
                continue;
            }
            let seq_no = index.next_seq_no;
            index.next_seq_no += 1;
            match (kind.as_str(), source) {
                ("delete", _) => {
                    let found = index.docs.remove(&doc_id);
                    let status = if found.is_some() { 200 } else { 404 };
                    items.push_value(&json!({"delete": {"_index": index_name, "_id": doc_id, "_version": found.map_or(1, |d| d.version + 1),
                        "result": if status == 200 { "deleted" } else { "not_found" }, "_shards": {"total": 2, "successful": 1, "failed": 0},
                        "_seq_no": seq_no, "_primary_term": 1, "status": status}}));
                }
                ("create", Some(_)) if index.docs.contains_key(&doc_id) => {
                    errors = true;
                    let reason = format!("[{doc_id}]: version conflict, document already exists (current version [1])");
                    items.push_value(
                        &json!({"create": fail(409, "version_conflict_engine_exception", &reason, &Some(doc_id))}),
                    );
                }
                (_, Some(source)) => {
                    let version = index.docs.get(&doc_id).map_or(1, |doc| doc.version + 1);
                    let result = if version == 1 { "created" } else { "updated" };
                    index.docs.insert(doc_id.clone(), Document { source, version, visible_from });
                    let status = if version == 1 { 201 } else { 200 };
                    items.push_ok(
                        &kind,
                        &Written {
                            _index: &index_name,
                            _id: &doc_id,
                            _version: version,
                            result,
                            _shards: SHARDS,
                            _seq_no: seq_no,
                            _primary_term: 1,
                            status,
                        },
                    );
                }
                _ => {}
            }
        }
    }
    if take_one(&double.faults.reset_after_apply_next) {
        // Applied, but the answer never arrives: the body stream fails, hyper aborts the
        // connection mid-response.
        let stream = futures::stream::once(async { Err::<Bytes, std::io::Error>(std::io::Error::other("reset")) });
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(stream))
            .unwrap_or_default();
    }
    let took = started.elapsed().as_millis() as u64;
    let mut body = format!("{{\"took\":{took},\"errors\":{errors},\"items\":").into_bytes();
    body.extend_from_slice(&items.finish());
    body.push(b'}');
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A successful item of a bulk answer.
#[derive(Serialize)]
struct Written<'a> {
    _index: &'a str,
    _id: &'a str,
    _version: u64,
    result: &'static str,
    _shards: Shards,
    _seq_no: u64,
    _primary_term: u64,
    status: u16,
}

#[derive(Serialize, Clone, Copy)]
struct Shards {
    total: u8,
    successful: u8,
    failed: u8,
}

const SHARDS: Shards = Shards { total: 2, successful: 1, failed: 0 };

/// The `items` array of a bulk answer, written as it is built (thousands of items per
/// request: no tree of values).
struct ItemWriter {
    bytes: Vec<u8>,
}

impl ItemWriter {
    fn with_capacity(items: usize) -> Self {
        let mut bytes = Vec::with_capacity(items * 160 + 2);
        bytes.push(b'[');
        Self { bytes }
    }

    fn separator(&mut self) {
        if self.bytes.len() > 1 {
            self.bytes.push(b',');
        }
    }

    fn push_ok(&mut self, kind: &str, item: &Written<'_>) {
        self.separator();
        let _ = serde_json::to_writer(&mut self.bytes, &std::collections::BTreeMap::from([(kind, item)]));
    }

    fn push_value(&mut self, item: &Value) {
        self.separator();
        let _ = serde_json::to_writer(&mut self.bytes, item);
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes.push(b']');
        self.bytes
    }
}

fn next_refresh() -> Instant {
    Instant::now() + REFRESH_INTERVAL
}

async fn refresh_all(State(double): State<EsDouble>) -> Response {
    double.refresh();
    axum::Json(json!({"_shards": {"total": 1, "successful": 1, "failed": 0}})).into_response()
}

async fn refresh_index(State(double): State<EsDouble>, Path(_index): Path<String>) -> Response {
    refresh_all(State(double)).await
}

async fn set_faults(State(double): State<EsDouble>, body: Bytes) -> Response {
    let settings: FaultSettings = match serde_json::from_slice(&body) {
        Ok(settings) => settings,
        Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    };
    let f = &double.faults;
    *f.reject_sensor_containing.lock() = settings.reject_sensor_containing;
    for (to, from) in [
        (&f.item_429_every, settings.item_429_every),
        (&f.http_429_next, settings.http_429_next),
        (&f.http_503_next, settings.http_503_next),
        (&f.reset_next, settings.reset_next),
        (&f.reset_after_apply_next, settings.reset_after_apply_next),
    ] {
        to.store(from, Ordering::SeqCst);
    }
    f.delay_ms.store(settings.delay_ms, Ordering::SeqCst);
    axum::Json(json!({"acknowledged": true})).into_response()
}

#[derive(Deserialize)]
struct DownFor {
    seconds: u64,
}

/// `POST /_double/down?seconds=N`: the node goes down (listener closed, connections cut)
/// right after answering, and comes back N seconds later.
async fn down_for(
    State(double): State<EsDouble>,
    axum::extract::Query(down): axum::extract::Query<DownFor>,
) -> Response {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        double.set_down();
        tokio::time::sleep(Duration::from_secs(down.seconds)).await;
        double.set_up();
    });
    axum::Json(json!({"acknowledged": true, "downForSeconds": down.seconds})).into_response()
}

async fn stats(State(double): State<EsDouble>) -> Response {
    axum::Json(double.stats()).into_response()
}

// ---- search ----------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct SearchParams {
    ignore_unavailable: Option<String>,
    allow_no_indices: Option<String>,
}

async fn search_all(
    State(double): State<EsDouble>,
    method: Method,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    search(double, "_all".into(), method, query, body, false).await
}

async fn search_index(
    State(double): State<EsDouble>,
    Path(index): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    search(double, index, method, query, body, false).await
}

async fn count_index(
    State(double): State<EsDouble>,
    Path(index): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    search(double, index, method, query, body, true).await
}

const SEARCH_KEYS: &[&str] = &[
    "query",
    "size",
    "from",
    "sort",
    "search_after",
    "track_total_hits",
    "aggs",
    "aggregations",
    "_source",
    "timeout",
];

/// A document as search sees it: its source and its analysed text fields.
struct Visible<'a> {
    index: &'a str,
    id: &'a str,
    source: &'a Value,
    properties: &'a Map<String, Value>,
}

impl Visible<'_> {
    fn field_type(&self, field: &str) -> &str {
        self.properties.get(field).and_then(|m| m["type"].as_str()).unwrap_or("keyword")
    }

    /// The values of a field: its own, or (for a `copy_to` target) those copied to it.
    fn values(&self, field: &str) -> Vec<&Value> {
        let mut values: Vec<&Value> = Vec::new();
        if let Some(value) = self.source.get(field) {
            values.push(value);
        }
        for (name, mapping) in self.properties {
            let copies = match &mapping["copy_to"] {
                Value::String(target) => target == field,
                Value::Array(targets) => targets.iter().any(|t| t.as_str() == Some(field)),
                _ => false,
            };
            if copies && let Some(value) = self.source.get(name) {
                values.push(value);
            }
        }
        values
    }

    /// Analysed tokens with positions (a gap of 100 between values).
    fn tokens(&self, field: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut position = 0;
        for value in self.values(field) {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            for word in crate::search::words(&text) {
                out.push((position, word));
                position += 1;
            }
            position += 100;
        }
        out
    }
}

fn parsing(reason: String) -> (StatusCode, &'static str, String) {
    (StatusCode::BAD_REQUEST, "parsing_exception", reason)
}

type QueryResult<T> = Result<T, (StatusCode, &'static str, String)>;

fn date_value(value: &Value, format: Option<&str>) -> QueryResult<i64> {
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| parsing(format!("failed to parse date field [{n}]"))),
        Value::String(s) => {
            if format == Some("epoch_millis")
                || s.bytes().all(|b| b.is_ascii_digit() || b == b'-') && s.parse::<i64>().is_ok()
            {
                return s.parse::<i64>().map_err(|_| parsing(format!("failed to parse date field [{s}]")));
            }
            chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).map_err(|_| {
                parsing(format!(
                    "failed to parse date field [{s}] with format [strict_date_optional_time||epoch_millis]"
                ))
            })
        }
        _ => Err(parsing("failed to parse date field".into())),
    }
}

fn single_field(query: &Value, kind: &str) -> QueryResult<(String, Value)> {
    let object = query
        .as_object()
        .ok_or_else(|| parsing(format!("[{kind}] query malformed, no start_object after query name")))?;
    if object.len() != 1 {
        return Err(parsing(format!("[{kind}] query doesn't support multiple fields, found [{}]", object.len())));
    }
    let (field, value) = object.iter().next().ok_or_else(|| parsing(format!("[{kind}] query malformed")))?;
    Ok((field.clone(), value.clone()))
}

fn term_equal(doc: &Visible<'_>, field: &str, wanted: &Value) -> bool {
    let kind = doc.field_type(field);
    doc.values(field).into_iter().any(|value| match kind {
        "boolean" => {
            let as_bool = |v: &Value| v.as_bool().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
            as_bool(value).is_some() && as_bool(value) == as_bool(wanted)
        }
        "double" | "float" | "long" | "integer" | "short" => {
            value.as_f64().is_some() && value.as_f64() == wanted.as_f64()
        }
        "date" => date_value(value, None).ok() == date_value(wanted, None).ok(),
        _ => match (value, wanted) {
            (Value::String(a), Value::String(b)) => a == b,
            (a, b) => a == b,
        },
    })
}

fn matches(doc: &Visible<'_>, query: &Value) -> QueryResult<bool> {
    let object = query.as_object().ok_or_else(|| parsing("query malformed, must start with start_object".into()))?;
    if object.len() != 1 {
        return Err(parsing("[_na] query malformed, more than one query name in one object".into()));
    }
    let Some((kind, body)) = object.iter().next() else { return Ok(true) };
    match kind.as_str() {
        "match_all" => Ok(true),
        "bool" => {
            let body = body.as_object().ok_or_else(|| parsing("[bool] query malformed".into()))?;
            let clauses = |name: &str| -> Vec<Value> {
                match body.get(name) {
                    Some(Value::Array(items)) => items.clone(),
                    Some(Value::Object(_)) => vec![body[name].clone()],
                    _ => Vec::new(),
                }
            };
            for key in body.keys() {
                if !["must", "filter", "must_not", "should", "minimum_should_match", "boost", "_name"]
                    .contains(&key.as_str())
                {
                    return Err(parsing(format!("[bool] query does not support [{key}]")));
                }
            }
            for clause in clauses("must").iter().chain(clauses("filter").iter()) {
                if !matches(doc, clause)? {
                    return Ok(false);
                }
            }
            for clause in &clauses("must_not") {
                if matches(doc, clause)? {
                    return Ok(false);
                }
            }
            let should = clauses("should");
            if !should.is_empty() {
                let minimum = body
                    .get("minimum_should_match")
                    .and_then(Value::as_u64)
                    .unwrap_or(if clauses("must").is_empty() && clauses("filter").is_empty() { 1 } else { 0 });
                let mut hits = 0;
                for clause in &should {
                    if matches(doc, clause)? {
                        hits += 1;
                    }
                }
                return Ok(hits >= minimum);
            }
            Ok(true)
        }
        "term" => {
            let (field, value) = single_field(body, "term")?;
            let value = match value {
                Value::Object(inner) => {
                    inner.get("value").cloned().ok_or_else(|| parsing("[term] query does not support [...]".into()))?
                }
                other => other,
            };
            Ok(term_equal(doc, &field, &value))
        }
        "terms" => {
            let (field, values) = single_field(body, "terms")?;
            let values =
                values.as_array().ok_or_else(|| parsing("[terms] query does not support [...]".into()))?.clone();
            Ok(values.iter().any(|value| term_equal(doc, &field, value)))
        }
        "exists" => {
            let field =
                body["field"].as_str().ok_or_else(|| parsing("[exists] must be provided with a [field]".into()))?;
            Ok(!doc.values(field).is_empty())
        }
        "range" => {
            let (field, bounds) = single_field(body, "range")?;
            let bounds = bounds.as_object().ok_or_else(|| parsing("[range] query malformed".into()))?;
            let format = bounds.get("format").and_then(Value::as_str);
            let kind = doc.field_type(&field);
            for key in bounds.keys() {
                if !["gte", "gt", "lte", "lt", "format", "time_zone", "boost"].contains(&key.as_str()) {
                    return Err(parsing(format!("[range] query does not support [{key}]")));
                }
            }
            let Some(value) = doc.values(&field).first().copied() else { return Ok(false) };
            // `format` reads the bounds; the document's value is read by its mapping.
            let numeric = |v: &Value, format: Option<&str>| -> QueryResult<f64> {
                if kind == "date" {
                    date_value(v, format).map(|ms| ms as f64)
                } else {
                    v.as_f64().ok_or_else(|| parsing("[range] bound is not a number".into()))
                }
            };
            let actual = numeric(value, None)?;
            for (key, bound) in bounds {
                let ok = match key.as_str() {
                    "gte" => actual >= numeric(bound, format)?,
                    "gt" => actual > numeric(bound, format)?,
                    "lte" => actual <= numeric(bound, format)?,
                    "lt" => actual < numeric(bound, format)?,
                    _ => true,
                };
                if !ok {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        "match_phrase" | "match_phrase_prefix" => {
            let (field, spec) = single_field(body, kind)?;
            let text = match &spec {
                Value::String(text) => text.clone(),
                Value::Object(inner) => {
                    for key in inner.keys() {
                        if !["query", "analyzer", "slop", "max_expansions", "boost", "zero_terms_query"]
                            .contains(&key.as_str())
                        {
                            return Err(parsing(format!("[{kind}] query does not support [{key}]")));
                        }
                    }
                    inner
                        .get("query")
                        .and_then(Value::as_str)
                        .ok_or_else(|| parsing(format!("[{kind}] requires query value")))?
                        .to_string()
                }
                _ => return Err(parsing(format!("[{kind}] unknown token"))),
            };
            let wanted: Vec<String> = crate::search::words(&text).collect();
            if wanted.is_empty() {
                return Ok(false);
            }
            let prefix = kind == "match_phrase_prefix";
            let tokens = doc.tokens(&field);
            Ok(tokens.iter().enumerate().any(|(start, (position, _))| {
                wanted.iter().enumerate().all(|(k, word)| {
                    tokens.get(start + k).is_some_and(|(p, token)| {
                        *p == position + k
                            && if prefix && k == wanted.len() - 1 {
                                token.starts_with(word.as_str())
                            } else {
                                token == word
                            }
                    })
                })
            }))
        }
        other => Err(parsing(format!("unknown query [{other}]"))),
    }
}

/// Sort key of a document: each sort field's value (dates in epoch ms).
fn sort_values(doc: &Visible<'_>, sort: &[(String, bool)]) -> Vec<Value> {
    sort.iter()
        .map(|(field, _)| {
            let value = doc.values(field).first().map(|v| (*v).clone()).unwrap_or(Value::Null);
            if doc.field_type(field) == "date" {
                date_value(&value, None).map(Value::from).unwrap_or(Value::Null)
            } else {
                value
            }
        })
        .collect()
}

fn compare(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.as_str().unwrap_or_default().cmp(b.as_str().unwrap_or_default()),
    }
}

fn parse_sort(sort: &Value) -> QueryResult<Vec<(String, bool)>> {
    let items = match sort {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(field) => Ok((field.clone(), false)),
            Value::Object(object) if object.len() == 1 => {
                let (field, spec) = object.iter().next().ok_or_else(|| parsing("[sort] malformed".into()))?;
                let order = match spec {
                    Value::String(order) => order.as_str(),
                    Value::Object(inner) => inner.get("order").and_then(Value::as_str).unwrap_or("asc"),
                    _ => return Err(parsing("[sort] malformed".into())),
                };
                match order {
                    "asc" => Ok((field.clone(), false)),
                    "desc" => Ok((field.clone(), true)),
                    other => Err(parsing(format!("[sort] unknown order [{other}]"))),
                }
            }
            _ => Err(parsing("[sort] malformed".into())),
        })
        .collect()
}

fn aggregate(docs: &[&Visible<'_>], aggs: &Value) -> QueryResult<Value> {
    let mut out = Map::new();
    for (name, spec) in aggs.as_object().into_iter().flatten() {
        let spec = spec.as_object().ok_or_else(|| parsing(format!("[{name}] aggregation malformed")))?;
        let sub = spec.get("aggs").or_else(|| spec.get("aggregations"));
        let kinds: Vec<&String> = spec.keys().filter(|k| *k != "aggs" && *k != "aggregations").collect();
        if kinds.len() != 1 {
            return Err(parsing(format!("Expected exactly one aggregation type in [{name}]")));
        }
        let kind = kinds[0].as_str();
        let body = &spec[kind];
        let with_sub = |bucket: &mut Map<String, Value>, members: &[&Visible<'_>]| -> QueryResult<()> {
            if let Some(sub) = sub
                && let Value::Object(values) = aggregate(members, sub)?
            {
                bucket.extend(values);
            }
            Ok(())
        };
        let result = match kind {
            "date_histogram" => {
                let field =
                    body["field"].as_str().ok_or_else(|| parsing("[date_histogram] requires [field]".into()))?;
                let interval = body["fixed_interval"]
                    .as_str()
                    .and_then(|text| humantime::parse_duration(text).ok())
                    .map(|d| d.as_millis() as i64)
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| parsing("[date_histogram] requires a valid [fixed_interval]".into()))?;
                let mut buckets: BTreeMap<i64, Vec<&Visible<'_>>> = BTreeMap::new();
                for doc in docs {
                    if let Some(value) = doc.values(field).first()
                        && let Ok(ms) = date_value(value, None)
                    {
                        buckets.entry(ms.div_euclid(interval) * interval).or_default().push(doc);
                    }
                }
                let mut list = Vec::new();
                for (key, members) in buckets {
                    let mut bucket = Map::new();
                    bucket.insert("key_as_string".into(), json!(crate::store::ser::rfc3339(key)));
                    bucket.insert("key".into(), json!(key));
                    bucket.insert("doc_count".into(), json!(members.len()));
                    with_sub(&mut bucket, &members)?;
                    list.push(Value::Object(bucket));
                }
                json!({"buckets": list})
            }
            "terms" => {
                let field = body["field"].as_str().ok_or_else(|| parsing("[terms] requires [field]".into()))?;
                let size = body["size"].as_u64().unwrap_or(10) as usize;
                let mut groups: BTreeMap<String, Vec<&Visible<'_>>> = BTreeMap::new();
                for doc in docs {
                    for value in doc.values(field) {
                        let key = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
                        groups.entry(key).or_default().push(doc);
                    }
                }
                let by_key = body["order"].get("_key").is_some();
                let mut groups: Vec<(String, Vec<&Visible<'_>>)> = groups.into_iter().collect();
                if !by_key {
                    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
                }
                let other: usize = groups.iter().skip(size).map(|(_, members)| members.len()).sum();
                let mut list = Vec::new();
                for (key, members) in groups.into_iter().take(size) {
                    let mut bucket = Map::new();
                    bucket.insert("key".into(), json!(key));
                    bucket.insert("doc_count".into(), json!(members.len()));
                    with_sub(&mut bucket, &members)?;
                    list.push(Value::Object(bucket));
                }
                json!({"doc_count_error_upper_bound": 0, "sum_other_doc_count": other, "buckets": list})
            }
            "filter" => {
                let mut members = Vec::new();
                for doc in docs {
                    if matches(doc, body)? {
                        members.push(*doc);
                    }
                }
                let mut bucket = Map::new();
                bucket.insert("doc_count".into(), json!(members.len()));
                with_sub(&mut bucket, &members)?;
                Value::Object(bucket)
            }
            other => return Err(parsing(format!("Unknown aggregation type [{other}] did you mean [terms]?"))),
        };
        out.insert(name.clone(), result);
    }
    Ok(Value::Object(out))
}

async fn search(
    double: EsDouble,
    expression: String,
    method: Method,
    query: Option<String>,
    body: Bytes,
    count: bool,
) -> Response {
    if let Some(fault) = double.before_answer().await {
        return fault;
    }
    if method != Method::GET && method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "illegal_argument_exception", "method not allowed");
    }
    let params: SearchParams = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let request: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(Value::Object(object)) => Value::Object(object),
            _ => {
                return double.violation(
                    StatusCode::BAD_REQUEST,
                    "parsing_exception",
                    "request body must be a JSON object".into(),
                );
            }
        }
    };
    let allowed: &[&str] = if count { &["query"] } else { SEARCH_KEYS };
    if let Some(key) =
        request.as_object().into_iter().flatten().map(|(k, _)| k).find(|k| !allowed.contains(&k.as_str()))
    {
        return double.violation(
            StatusCode::BAD_REQUEST,
            "parsing_exception",
            format!("Unknown key for a START_OBJECT in [{key}]."),
        );
    }
    let outcome = run_search(&double.cluster.lock(), &expression, &params, &request, count);
    match outcome {
        Ok(reply) => {
            double.cluster.lock().stats.search_requests += 1;
            axum::Json(reply).into_response()
        }
        Err((status, kind, reason, true)) => double.violation(status, kind, reason),
        Err((status, kind, reason, false)) => error(status, kind, &reason),
    }
}

/// A search failure: status, type, reason, and whether the request broke the API's shape.
type SearchFailure = (StatusCode, &'static str, String, bool);

fn run_search(
    cluster: &Cluster,
    expression: &str,
    params: &SearchParams,
    request: &Value,
    count: bool,
) -> Result<Value, SearchFailure> {
    let now = Instant::now();
    let names: Vec<&String> = cluster.indices.keys().filter(|name| matches_expression(expression, name)).collect();
    let concrete_missing = expression
        .split(',')
        .find(|part| !part.contains('*') && *part != "_all" && !cluster.indices.contains_key(*part));
    if let Some(missing) = concrete_missing
        && params.ignore_unavailable.as_deref() != Some("true")
    {
        return Err((StatusCode::NOT_FOUND, "index_not_found_exception", format!("no such index [{missing}]"), false));
    }
    if names.is_empty() && params.allow_no_indices.as_deref() == Some("false") {
        return Err((
            StatusCode::NOT_FOUND,
            "index_not_found_exception",
            format!("no such index [{expression}]"),
            false,
        ));
    }
    let mut docs = Vec::new();
    for name in &names {
        let index = &cluster.indices[*name];
        for (id, doc) in &index.docs {
            if doc.visible_from <= now {
                docs.push(Visible {
                    index: name.as_str(),
                    id: id.as_str(),
                    source: &doc.source,
                    properties: &index.properties,
                });
            }
        }
    }
    let query = request.get("query").cloned().unwrap_or(json!({"match_all": {}}));
    let mut hits = Vec::new();
    for doc in &docs {
        match matches(doc, &query) {
            Ok(true) => hits.push(doc),
            Ok(false) => {}
            Err((status, kind, reason)) => return Err((status, kind, reason, true)),
        }
    }
    if count {
        return Ok(json!({"count": hits.len(), "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}}));
    }
    let sort = match parse_sort(&request["sort"]) {
        Ok(sort) => sort,
        Err((status, kind, reason)) => return Err((status, kind, reason, true)),
    };
    let ordering = |a: &Vec<Value>, b: &Vec<Value>| {
        sort.iter()
            .zip(a.iter().zip(b))
            .map(|((_, desc), (x, y))| if *desc { compare(y, x) } else { compare(x, y) })
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    let mut keyed: Vec<(Vec<Value>, &Visible<'_>)> = hits.iter().map(|doc| (sort_values(doc, &sort), *doc)).collect();
    keyed.sort_by(|a, b| ordering(&a.0, &b.0).then_with(|| a.1.id.cmp(b.1.id)));
    if let Some(after) = request.get("search_after") {
        let after = after.as_array().cloned().unwrap_or_default();
        if after.len() != sort.len() {
            return Err((
                StatusCode::BAD_REQUEST,
                "illegal_argument_exception",
                format!("search_after has {} value(s) but sort has {}.", after.len(), sort.len()),
                true,
            ));
        }
        keyed.retain(|(values, _)| ordering(values, &after).is_gt());
    }
    let aggregations = match request.get("aggs").or_else(|| request.get("aggregations")) {
        Some(aggs) => match aggregate(&hits, aggs) {
            Ok(result) => Some(result),
            Err((status, kind, reason)) => return Err((status, kind, reason, true)),
        },
        None => None,
    };
    let from = request["from"].as_u64().unwrap_or(0) as usize;
    let size = request["size"].as_u64().unwrap_or(10) as usize;
    let total = keyed.len();
    let page: Vec<Value> = keyed
        .iter()
        .skip(from)
        .take(size)
        .map(|(values, doc)| {
            json!({"_index": doc.index, "_id": doc.id, "_score": null, "_source": doc.source, "sort": values})
        })
        .collect();
    let shards = names.len();
    let mut reply = json!({
        "took": 1,
        "timed_out": false,
        "_shards": {"total": shards, "successful": shards, "skipped": 0, "failed": 0},
        "hits": {"max_score": null, "hits": page},
    });
    if request["track_total_hits"] != json!(false) {
        reply["hits"]["total"] = json!({"value": total, "relation": "eq"});
    }
    if let Some(aggregations) = aggregations {
        reply["aggregations"] = aggregations;
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn down_refuses_connections_until_up() {
        let double = EsDouble::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert!(tokio::net::TcpStream::connect(double.addr).await.is_ok());
        double.set_down();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(tokio::net::TcpStream::connect(double.addr).await.is_err(), "down: refused");
        double.set_up();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(tokio::net::TcpStream::connect(double.addr).await.is_ok(), "up again");
        // The same through the control endpoint.
        let answer =
            reqwest::Client::new().post(format!("{}/_double/down?seconds=1", double.url())).send().await.unwrap();
        assert!(answer.status().is_success());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(tokio::net::TcpStream::connect(double.addr).await.is_err(), "down for a second");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(tokio::net::TcpStream::connect(double.addr).await.is_ok(), "up after it");
    }
}
