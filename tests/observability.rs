//! Observability: `/metrics` in both exposition formats (checked by Prometheus'
//! `promtool`), and OpenTelemetry traces of real runs collected by an OTLP receiver in
//! the test (gRPC through tonic, HTTP/protobuf through axum, both on the
//! `opentelemetry-proto` messages).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Process, eventually, sources, start};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::{Value, json};

/// One received span, in hex as the W3C header writes ids.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    links: Vec<(String, String)>,
    service: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().expect("collector lock");
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| value_text(attribute.value.as_ref()))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        links: span.links.iter().map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id))).collect(),
                        service: service.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|attribute| (attribute.key.clone(), value_text(attribute.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().expect("collector lock").clone()
    }
}

fn value_text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match value.and_then(|value| value.value.as_ref()) {
        Some(V::StringValue(text)) => text.clone(),
        Some(V::IntValue(number)) => number.to_string(),
        Some(V::DoubleValue(number)) => number.to_string(),
        Some(V::BoolValue(flag)) => flag.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// An OTLP/gRPC receiver on a free loopback port; returns its endpoint.
async fn grpc_receiver(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tokio_stream_of(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

/// An OTLP/HTTP (protobuf) receiver on a free loopback port; returns its endpoint.
async fn http_receiver(collector: Collector) -> String {
    use axum::routing::post;
    use prost::Message;
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: bytes::Bytes| {
            let collector = collector.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        collector.take(request);
                        let response = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                        (axum::http::StatusCode::OK, [("content-type", "application/x-protobuf")], response)
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, [("content-type", "text/plain")], Vec::new()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Events of one sensor over 12 s, so the 1 s windows before the last few fire within
/// the request that carries them.
fn one_request() -> Value {
    let start = chrono::Utc::now().timestamp_millis() / 1000 * 1000 - 60_000;
    let events: Vec<Value> = (0..120)
        .map(|i| json!({"sensorId": "traced-1", "eventType": "temperature", "value": 20.0 + (i % 7) as f64, "timestamp": start + i * 100}))
        .collect();
    Value::Array(events)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The spans of `trace_id`, once one named `last` arrived.
async fn trace_with(collector: &Collector, trace_id: &str, last: &str) -> Vec<Received> {
    eventually(Duration::from_secs(30), &format!("a {last} span of trace {trace_id}"), || async {
        let spans: Vec<Received> = collector.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
        spans.iter().any(|s| s.name == last).then_some(spans)
    })
    .await
}

/// Walk from `from` to the root through parents; the names on the way, leaf first.
fn path_to_root(spans: &[Received], from: &Received) -> Vec<String> {
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut names = vec![from.name.clone()];
    let mut current = from;
    while let Some(parent) = by_id.get(current.parent.as_str()) {
        names.push(parent.name.clone());
        current = parent;
    }
    names.push(format!("parent:{}", current.parent));
    names
}

async fn post_traced(base: &str, body: &Value) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/api/events"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(body)
        .send()
        .await
        .expect("request reaches tidemark")
        .status()
        .as_u16()
}

/// A `tidemark run` on SQLite in `dir` with 1 s windows, exporting traces to `endpoint`,
/// plus `more` settings.
fn traced_process(dir: &std::path::Path, endpoint: String, more: &[(&'static str, &str)]) -> Process {
    let mut settings = vec![
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.join("t.db").display())),
        ("TIDEMARK__PIPELINE__WINDOW", "1s".to_string()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".to_string()),
        ("TIDEMARK__TELEMETRY__OTLP_ENDPOINT", endpoint),
    ];
    settings.extend(more.iter().map(|(key, value)| (*key, value.to_string())));
    Process::start(&settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_from_the_http_span_to_the_sink_write() {
    let collector = Collector::default();
    let endpoint = grpc_receiver(collector.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let process = traced_process(
        dir.path(),
        endpoint,
        &[
            ("TIDEMARK__TELEMETRY__OTLP_PROTOCOL", "grpc"),
            // Long enough that concurrent requests' results share a write.
            ("TIDEMARK__STORE__LINGER", "300ms"),
            // A caller's sampled traceparent is continued whatever the ratio.
            ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "0"),
        ],
    );
    let base = process.client().base;
    assert_eq!(post_traced(&base, &one_request()).await, 202);

    let spans = trace_with(&collector, TRACE_ID, "sink.write").await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for expected in ["POST /api/events", "router.route", "partition.batch", "window.fire", "sink.write"] {
        assert!(names.contains(&expected), "no {expected} span in {names:?}");
    }
    let write = spans.iter().find(|s| s.name == "sink.write").expect("sink.write");
    assert_eq!(
        path_to_root(&spans, write),
        [
            "sink.write",
            "window.fire",
            "partition.batch",
            "router.route",
            "POST /api/events",
            &format!("parent:{CALLER_SPAN}")
        ],
        "the sink write is connected to the caller's span"
    );
    let request = spans.iter().find(|s| s.name == "POST /api/events").expect("request span");
    assert_eq!(request.service, "tidemark");
    assert_eq!(request.attributes.get("http.response.status_code").map(String::as_str), Some("202"));
    assert_eq!(write.attributes.get("sink").map(String::as_str), Some("store"));

    // Two traced requests written by one sink batch: the write continues one trace and
    // links the other.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let client = reqwest::Client::new();
    let post = |trace: &'static str, sensor: &'static str| {
        let mut body = one_request();
        for event in body.as_array_mut().into_iter().flatten() {
            event["sensorId"] = json!(sensor);
        }
        client
            .post(format!("{base}/api/events"))
            .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))
            .json(&body)
            .send()
    };
    let third_trace = "5b8efff798038103d269b633813fc60c";
    let (a, b) = tokio::join!(post(other_trace, "traced-2"), post(third_trace, "traced-3"));
    assert_eq!((a.expect("sent").status().as_u16(), b.expect("sent").status().as_u16()), (202, 202));
    eventually(Duration::from_secs(30), "a sink write that links the other request's trace", || async {
        let spans = collector.spans();
        spans
            .iter()
            .find(|s| {
                s.name == "sink.write"
                    && [other_trace, third_trace].contains(&s.trace_id.as_str())
                    && s.links
                        .iter()
                        .any(|(trace, _)| [other_trace, third_trace].contains(&trace.as_str()) && *trace != s.trace_id)
            })
            .map(|_| ())
    })
    .await;

    // Without a caller's trace and at ratio 0 nothing is sampled: no new trace appears.
    let before = collector.spans().len();
    let status = process.client().post_json(&one_request()).await.0;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let new: Vec<String> = collector.spans()[before..].iter().map(|s| format!("{} {}", s.trace_id, s.name)).collect();
    assert!(new.is_empty(), "unsampled requests exported spans: {new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kafka_mode_the_trace_continues_across_the_topic() {
    use tidemark::sim::kafka::MockBroker;
    let collector = Collector::default();
    let endpoint = http_receiver(collector.clone()).await;
    let topics = [("sensor-events".to_string(), 2), ("sensor-events.dlq".to_string(), 1)];
    let mock = MockBroker::start(1, &topics, Duration::ZERO).expect("mock cluster");
    let brokers = mock.bootstrap_servers().expect("bootstrap servers");
    let dir = tempfile::tempdir().expect("tempdir");
    let process = traced_process(
        dir.path(),
        endpoint,
        &[
            ("TIDEMARK__KAFKA__ENABLED", "true"),
            ("TIDEMARK__INGEST__MODE", "kafka"),
            ("TIDEMARK__KAFKA__BROKERS", &brokers),
            ("TIDEMARK__KAFKA__GROUP_ID", "traced"),
            ("TIDEMARK__PIPELINE__PARTITIONS", "2"),
            ("TIDEMARK__TELEMETRY__OTLP_PROTOCOL", "http/protobuf"),
            ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "1"),
        ],
    );
    let base = process.client().base;
    // The consumer group forms first; until then a 202 means "on the topic" all the same.
    assert_eq!(post_traced(&base, &one_request()).await, 202);

    let spans = trace_with(&collector, TRACE_ID, "sink.write").await;
    let produce = spans.iter().find(|s| s.name == "kafka.produce").expect("a kafka.produce span");
    let consume = spans.iter().find(|s| s.name == "kafka.consume").expect("a kafka.consume span in the same trace");
    assert_eq!(consume.parent, produce.span_id, "the consumer continues the producer's span (from the header)");
    let write = spans.iter().find(|s| s.name == "sink.write").expect("sink.write");
    let path = path_to_root(&spans, write);
    assert_eq!(
        path,
        [
            "sink.write",
            "window.fire",
            "partition.batch",
            "kafka.consume",
            "kafka.produce",
            "POST /api/events",
            &format!("parent:{CALLER_SPAN}")
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_format_passes_promtool_and_names_no_sensor() {
    let promtool = std::env::var("TIDEMARK_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = start(sources(dir.path()).with("pipeline.window", "1s")).await;
    let client = common::Client::new(&runtime);
    // Accepted, rejected (an unknown field type) and late events, so most families have samples.
    let (status, _) = client.post_json(&one_request()).await;
    assert_eq!(status, 202);
    let (status, _) =
        client.post_json(&json!([{"sensorId": "s", "eventType": "t", "value": "x", "timestamp": 1}])).await;
    assert_eq!(status, 202);
    eventually(Duration::from_secs(10), "windows fired", || async {
        let text = reqwest::get(format!("{}/metrics", client.base)).await.ok()?.text().await.ok()?;
        text.lines().any(|l| l.starts_with("tidemark_windows_fired_total") && !l.ends_with(" 0")).then_some(())
    })
    .await;

    let http = reqwest::Client::new();
    let text = http
        .get(format!("{}/metrics", client.base))
        .header("accept", "text/plain; version=0.0.4")
        .send()
        .await
        .expect("metrics");
    assert!(text.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/plain; version=0.0.4"));
    let text = text.text().await.expect("body");
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "OpenMetrics-only lines in the text format");
    assert!(text.contains("# TYPE tidemark_events_accepted_total counter"), "{text}");

    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {promtool} ({error}): install Prometheus (Debian package `prometheus`, scripts/test.sh does) \
                 or set TIDEMARK_TEST_PROMTOOL"
            )
        });
    {
        use std::io::Write;
        let mut stdin = check.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("promtool reads the exposition");
    }
    let output = check.wait_with_output().expect("promtool finishes");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");

    // Prometheus' own Accept header still gets OpenMetrics.
    let openmetrics = http
        .get(format!("{}/metrics", client.base))
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        .send()
        .await
        .expect("metrics");
    assert!(
        openmetrics.headers()["content-type"].to_str().unwrap_or_default().starts_with("application/openmetrics-text")
    );
    assert!(openmetrics.text().await.expect("body").ends_with("# EOF\n"));

    // Every family served is in the README's metrics table.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()) {
        assert!(readme.contains(&format!("`{family}`")), "README.md does not list {family}");
    }

    // No label carries a sensor id (bounded cardinality).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("traced-1") && !line.contains("sensor_id") && !line.contains("sensorId"), "{line}");
    }
    runtime.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Grafana: the dashboards' structure, and every panel query on the data of a real run.

fn grafana_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana")
}

/// Provisioned data sources: uid → type.
fn provisioned_data_sources() -> HashMap<String, String> {
    let path = grafana_dir().join("provisioning/datasources/tidemark.yaml");
    let text = std::fs::read_to_string(&path).expect("datasource provisioning");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("provisioning is YAML");
    assert_eq!(yaml["apiVersion"].as_u64(), Some(1), "{}", path.display());
    let sources: HashMap<String, String> = yaml["datasources"]
        .as_sequence()
        .expect("datasources list")
        .iter()
        .map(|source| {
            let uid = source["uid"].as_str().expect("every data source has a uid").to_string();
            let kind = source["type"].as_str().expect("every data source has a type").to_string();
            assert!(source["url"].as_str().is_some_and(|url| !url.is_empty()), "{uid} has no url");
            (uid, kind)
        })
        .collect();
    // The Prometheus source links exemplars to a provisioned trace source.
    let prometheus = yaml["datasources"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|source| source["type"] == "prometheus")
        .expect("a Prometheus data source");
    let destination = prometheus["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"].as_str();
    assert_eq!(destination.and_then(|uid| sources.get(uid)).map(String::as_str), Some("tempo"));
    sources
}

fn dashboards() -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(grafana_dir().join("dashboards")).expect("grafana/dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "json") {
            let text = std::fs::read_to_string(&path).expect("dashboard");
            let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            all.push((path.file_name().unwrap_or_default().to_string_lossy().into_owned(), json));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Every query of a dashboard: (panel title, data source uid, query text).
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let uid = target["datasource"]["uid"].as_str().or(panel["datasource"]["uid"].as_str()).unwrap_or_default();
            let text = ["rawSql", "expr", "query"].iter().find_map(|key| target[*key].as_str()).unwrap_or_default();
            found.push((panel["title"].as_str().unwrap_or_default().to_string(), uid.to_string(), text.to_string()));
        }
    }
    found
}

/// `$name`, `${name}` and `[[name]]` references that are not Grafana built-ins (`$__…`).
fn variables_used(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let rest = &text[i + 1..];
            let rest = rest.strip_prefix('{').unwrap_or(rest);
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && !name.starts_with("__") {
                names.push(name);
            }
        }
        i += 1;
    }
    names
}

#[test]
fn grafana_dashboards_are_consistent_with_the_provisioning() {
    let sources = provisioned_data_sources();
    let all = dashboards();
    let titles: Vec<&str> = all.iter().filter_map(|(_, d)| d["title"].as_str()).collect();
    assert!(
        titles.iter().any(|t| t.contains("Predictions")) && titles.iter().any(|t| t.contains("Pipeline")),
        "{titles:?}"
    );
    let mut uids = std::collections::HashSet::new();
    for (file, dashboard) in &all {
        assert!(uids.insert(dashboard["uid"].as_str().unwrap_or_default().to_string()), "{file}: duplicate uid");
        assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "{file}: schemaVersion");
        let variables: Vec<&Value> = dashboard["templating"]["list"].as_array().into_iter().flatten().collect();
        let defined: Vec<&str> = variables.iter().filter_map(|v| v["name"].as_str()).collect();
        for variable in &variables {
            let uid = variable["datasource"]["uid"].as_str().unwrap_or_default();
            assert!(
                sources.contains_key(uid),
                "{file}: variable {} uses unknown data source {uid:?}",
                variable["name"]
            );
            let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).unwrap_or_default();
            for used in variables_used(query) {
                assert!(
                    defined.contains(&used.as_str()),
                    "{file}: variable {} uses undefined ${used}",
                    variable["name"]
                );
            }
        }
        let mut ids = std::collections::HashSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "{file}: duplicate panel id ({title})");
            let grid = &panel["gridPos"];
            let (x, w) = (grid["x"].as_u64().expect("gridPos.x"), grid["w"].as_u64().expect("gridPos.w"));
            assert!(x + w <= 24 && grid["h"].as_u64().is_some(), "{file}: {title} lies outside the 24-column grid");
            if panel["type"] == "row" {
                continue;
            }
            let uid = panel["datasource"]["uid"].as_str().unwrap_or_default();
            let kind = panel["datasource"]["type"].as_str().unwrap_or_default();
            assert_eq!(
                sources.get(uid).map(String::as_str),
                Some(kind),
                "{file}: {title}: data source {uid:?}/{kind:?}"
            );
            assert!(!panel["targets"].as_array().is_none_or(Vec::is_empty), "{file}: {title} has no query");
        }
        for (title, uid, text) in queries(dashboard) {
            assert!(sources.contains_key(&uid), "{file}: {title}: unknown data source {uid:?}");
            assert!(!text.trim().is_empty(), "{file}: {title}: empty query");
            for used in variables_used(&text) {
                assert!(
                    defined.contains(&used.as_str()),
                    "{file}: {title}: ${used} is not a variable of the dashboard"
                );
            }
        }
    }
}

#[cfg(not(feature = "chaos"))]
#[test]
fn grafana_dashboards_on_real_data_need_the_chaos_feature() {
    panic!("the dashboard data test restarts partitions with `--features chaos`; scripts/test.sh runs it");
}

#[cfg(feature = "chaos")]
/// Grafana's SQL macros, as its PostgreSQL data source expands them.
fn expand_sql(text: &str, from: &str, to: &str, variables: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    while let Some(at) = out.find("$__timeFilter(") {
        let end = at + out[at..].find(')').expect("closing parenthesis");
        let column = out[at + "$__timeFilter(".len()..end].trim().to_string();
        out.replace_range(at..=end, &format!("{column} BETWEEN '{from}' AND '{to}'"));
    }
    while let Some(at) = out.find("$__timeGroupAlias(") {
        let end = at + out[at..].find(')').expect("closing parenthesis");
        let args: Vec<String> = out[at + "$__timeGroupAlias(".len()..end]
            .split(',')
            .map(|a| a.trim().trim_matches('\'').to_string())
            .collect();
        let seconds = humantime::parse_duration(&args[1]).expect("interval").as_secs();
        out.replace_range(at..=end, &format!("floor(extract(epoch from {})/{seconds})*{seconds} AS \"time\"", args[0]));
    }
    for (name, value) in variables {
        out = out.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "a macro or variable the test does not expand: {out}");
    out
}

#[cfg(feature = "chaos")]
fn expand_promql(text: &str) -> String {
    let out = text.replace("$__rate_interval", "15s").replace("$instance", ".*");
    assert!(!out.contains('$'), "a macro or variable the test does not expand: {out}");
    out
}

#[cfg(feature = "chaos")]
/// Prometheus (the Debian package's binary), scraping `target` every second.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "chaos")]
impl Prometheus {
    fn start(target: &str) -> Self {
        let binary = std::env::var("TIDEMARK_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tidemark\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = std::process::Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run {binary} ({error}): install Prometheus (Debian package `prometheus`; scripts/test.sh \
                     does) or set TIDEMARK_TEST_PROMETHEUS"
                )
            });
        Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let answer: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        assert_ne!(answer["status"], "error", "{expr}: {answer}");
        answer["data"]["result"].as_array().cloned()
    }
}

#[cfg(feature = "chaos")]
impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_panels_return_data_from_a_real_run() {
    use tidemark::sim::SimConfig;
    use tidemark::sim::es_double::EsDouble;
    use tidemark::sim::kafka::MockBroker;

    let collector = Collector::default();
    let otlp = http_receiver(collector.clone()).await;
    let topics = [("sensor-events".to_string(), 4), ("sensor-events.dlq".to_string(), 1)];
    let mock = MockBroker::start(1, &topics, Duration::ZERO).expect("mock cluster");
    let brokers = mock.bootstrap_servers().expect("bootstrap servers");
    let elasticsearch = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in starts");
    let store_url = common::fresh_postgres_database().await;
    let process = Process::start(&[
        ("TIDEMARK__STORE__URL", store_url.clone()),
        ("TIDEMARK__KAFKA__ENABLED", "true".into()),
        ("TIDEMARK__INGEST__MODE", "kafka".into()),
        ("TIDEMARK__KAFKA__BROKERS", brokers),
        ("TIDEMARK__KAFKA__GROUP_ID", "dashboards".into()),
        ("TIDEMARK__ELASTICSEARCH__ENABLED", "true".into()),
        ("TIDEMARK__ELASTICSEARCH__URLS", format!("[\"{}\"]", elasticsearch.url())),
        ("TIDEMARK__PIPELINE__WINDOW", "2s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".into()),
        // Models judge after 8 windows (16 s); the anomalies start at 25 s.
        ("TIDEMARK__SCORING__LEARNING_WINDOWS", "8".into()),
        ("TIDEMARK__TELEMETRY__OTLP_ENDPOINT", otlp),
        ("TIDEMARK__TELEMETRY__OTLP_PROTOCOL", "http/protobuf".into()),
        ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "1".into()),
        // A few partition panics: restarts to show (each replays from its checkpoint).
        ("TIDEMARK__CHAOS__PARTITION_PANIC_PROBABILITY", "0.0005".into()),
    ]);
    let prometheus = Prometheus::start(&process.addr);
    let client = process.client();

    // A minute of 40 sensors (3 event types) with injected anomalies, then invalid events.
    let now = chrono::Utc::now().timestamp_millis();
    let lines = common::workload(SimConfig {
        sensors: 40,
        rate: 400.0,
        duration: Some(Duration::from_secs(60)),
        seed: 15,
        start_ms: now - 90_000,
        anomalies: 6,
        anomalies_after: Duration::from_secs(25),
        anomaly_duration: Duration::from_secs(8),
        ..SimConfig::default()
    });
    let accepted = common::post_batches(&client, &lines, 2_000, Duration::from_millis(200)).await;
    assert_eq!(accepted as usize, lines.len());
    let (status, answer) = client
        .post(
            "/api/events",
            "application/x-ndjson",
            "{\"sensorId\":\"bad\",\"eventType\":\"t\",\"value\":\"x\"}\n{broken",
        )
        .await;
    assert_eq!((status, answer["rejected"].as_u64()), (202, Some(2)), "{answer}");

    // PostgreSQL: every SQL panel of every dashboard returns rows.
    let pool = sqlx::PgPool::connect(&store_url).await.expect("store");
    let from = chrono::DateTime::from_timestamp_millis(now - 3_600_000).expect("time").to_rfc3339();
    let to = chrono::DateTime::from_timestamp_millis(now + 300_000).expect("time").to_rfc3339();
    let anomalies = eventually(Duration::from_secs(60), "anomalies in the store", || async {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM predictions WHERE anomaly").fetch_one(&pool).await.ok()?;
        (count > 0).then_some(count)
    })
    .await;
    assert!(anomalies > 0);
    let rows_of = |sql: String| {
        let pool = pool.clone();
        async move {
            use sqlx::Row;
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}\n{e}"));
            rows.iter().map(|row| row.try_get::<String, _>(0).unwrap_or_default()).collect::<Vec<String>>()
        }
    };
    let mut sql_panels = 0;
    for (file, dashboard) in dashboards() {
        let variables: Vec<Value> = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
        let mut values: Vec<(&str, String)> = Vec::new();
        for variable in variables.iter().filter(|v| v["datasource"]["uid"] == "tidemark-postgres") {
            let name = variable["name"].as_str().expect("name");
            let query = expand_sql(variable["query"].as_str().expect("query"), &from, &to, &values);
            let found = rows_of(query).await;
            assert!(!found.is_empty(), "{file}: variable {name} has no values");
            // "All" for a variable that offers it, else the first (the default selection).
            let chosen = if variable["includeAll"] == true { found } else { found[..1].to_vec() };
            let quoted: Vec<String> = chosen.iter().map(|v| format!("'{}'", v.replace('\'', "''"))).collect();
            values.push((name, quoted.join(",")));
        }
        for (title, uid, text) in queries(&dashboard) {
            if uid != "tidemark-postgres" {
                continue;
            }
            let sql = expand_sql(&text, &from, &to, &values);
            let count = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|e| panic!("{file}: {title}\n{sql}\n{e}"))
                .len();
            assert!(count > 0, "{file}: {title} returns no rows:\n{sql}");
            sql_panels += 1;
        }
    }
    assert!(sql_panels >= 8, "only {sql_panels} SQL queries checked");

    // Prometheus: every PromQL panel returns series once a few scrapes are in.
    eventually(Duration::from_secs(60), "20 s of scrapes", || async {
        let result = prometheus.query("count_over_time(up{job=\"tidemark\"}[30s]) >= 20").await?;
        (!result.is_empty()).then_some(())
    })
    .await;
    let restarts = eventually(Duration::from_secs(60), "a partition restart", || async {
        let result = prometheus.query("sum(tidemark_actor_restarts_total) > 0").await?;
        (!result.is_empty()).then_some(result)
    })
    .await;
    assert!(!restarts.is_empty());
    let mut promql_panels = 0;
    for (file, dashboard) in dashboards() {
        for (title, uid, text) in queries(&dashboard) {
            if uid != "tidemark-prometheus" {
                continue;
            }
            let expr = expand_promql(&text);
            let series = prometheus.query(&expr).await.unwrap_or_default();
            assert!(!series.is_empty(), "{file}: {title} returns no series: {expr}");
            promql_panels += 1;
        }
    }
    assert!(promql_panels >= 12, "only {promql_panels} PromQL queries checked");

    // A sink write's exemplar names a trace the collector received.
    let exemplar_trace = eventually(Duration::from_secs(60), "a sink write exemplar with a trace id", || async {
        let end = chrono::Utc::now().timestamp();
        let answer: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query_exemplars", prometheus.url))
            .query(&[
                ("query", "tidemark_sink_write_seconds_bucket".to_string()),
                ("start", (end - 600).to_string()),
                ("end", end.to_string()),
            ])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let ids: Vec<String> = answer["data"]
            .as_array()?
            .iter()
            .flat_map(|series| series["exemplars"].as_array().cloned().unwrap_or_default())
            .filter_map(|exemplar| exemplar["labels"]["trace_id"].as_str().map(str::to_string))
            .collect();
        let spans = collector.spans();
        ids.into_iter().find(|id| spans.iter().any(|s| s.name == "sink.write" && &s.trace_id == id))
    })
    .await;
    assert_eq!(exemplar_trace.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_traceparent_user_property_is_continued() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let url = common::mqtt_url();
    let collector = Collector::default();
    let endpoint = grpc_receiver(collector.clone()).await;
    let prefix = format!("traced-{}-{}", std::process::id(), rand::random::<u32>());
    let dir = tempfile::tempdir().expect("tempdir");
    let client_id = format!("{prefix}-tidemark");
    let topics = format!("[\"{prefix}/{{sensorId}}/data\"]");
    let process = traced_process(
        dir.path(),
        endpoint,
        &[
            ("TIDEMARK__MQTT__ENABLED", "true"),
            ("TIDEMARK__MQTT__URL", &url),
            ("TIDEMARK__MQTT__CLIENT_ID", &client_id),
            ("TIDEMARK__MQTT__TOPICS", &topics),
            ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "0"),
        ],
    );
    let client = process.client();
    eventually(Duration::from_secs(15), "tidemark subscribed", || async {
        client.get_ok("/api/status").await["mqtt"]["subscribed"].as_bool().filter(|s| *s)
    })
    .await;

    let address = url.trim_start_matches("mqtt://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let mut options = rumqttc::v5::MqttOptions::new(format!("{prefix}-pub"), host, port.parse().expect("port"));
    options.set_keep_alive(Duration::from_secs(5));
    let (publisher, mut connection) = rumqttc::v5::AsyncClient::new(options, 100);
    let acknowledged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&acknowledged);
    tokio::spawn(async move {
        while let Ok(event) = connection.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) = event {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let events = one_request();
    for event in events.as_array().into_iter().flatten() {
        let properties = PublishProperties {
            user_properties: vec![("traceparent".into(), format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))],
            ..PublishProperties::default()
        };
        publisher
            .publish_with_properties(
                format!("{prefix}/traced-1/data"),
                QoS::AtLeastOnce,
                false,
                event.to_string(),
                properties,
            )
            .await
            .expect("queued");
    }
    eventually(Duration::from_secs(15), "the broker acknowledged every message", || async {
        (acknowledged.load(std::sync::atomic::Ordering::SeqCst) == 120).then_some(())
    })
    .await;

    let spans = trace_with(&collector, TRACE_ID, "sink.write").await;
    let receive = spans.iter().find(|s| s.name == "mqtt.receive").expect("an mqtt.receive span in the caller's trace");
    assert_eq!(receive.parent, CALLER_SPAN, "mqtt.receive continues the publisher's span");
    let write = spans.iter().find(|s| s.name == "sink.write").expect("sink.write");
    let path = path_to_root(&spans, write);
    assert_eq!(path[..5], ["sink.write", "window.fire", "partition.batch", "router.route", "mqtt.receive"], "{path:?}");
}

/// A log line written inside a traced span names the trace (JSON logs: the span's
/// `trace_id` field), so a log search leads to the trace: here the store sink's retry
/// warning of a failing write.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_inside_a_traced_span_carry_its_trace_id() {
    let collector = Collector::default();
    let endpoint = grpc_receiver(collector.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let process = traced_process(
        dir.path(),
        endpoint,
        &[
            ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "0"),
            // Every store write fails (and is retried): the sink logs a warning per attempt.
            ("TIDEMARK__CHAOS__STORE_BATCH_FAILURE_RATE", "1.0"),
        ],
    );
    assert_eq!(post_traced(&process.client().base, &one_request()).await, 202);
    let line = eventually(Duration::from_secs(20), "a retry warning inside the traced write", || async {
        process.log().lines().find_map(|line| {
            let entry: Value = serde_json::from_str(line).ok()?;
            let in_trace = entry["spans"]
                .as_array()?
                .iter()
                .any(|span| span["name"] == "sink.write" && span["trace_id"] == TRACE_ID);
            (in_trace && entry["fields"]["message"] == "store write failed, retrying").then(|| line.to_string())
        })
    })
    .await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
}
