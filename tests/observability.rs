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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_from_the_http_span_to_the_sink_write() {
    let collector = Collector::default();
    let endpoint = grpc_receiver(collector.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Process::start(&[
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.path().join("t.db").display())),
        ("TIDEMARK__PIPELINE__WINDOW", "1s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".into()),
        ("TIDEMARK__TELEMETRY__OTLP_ENDPOINT", endpoint),
        ("TIDEMARK__TELEMETRY__OTLP_PROTOCOL", "grpc".into()),
        // Long enough that concurrent requests' results share a write.
        ("TIDEMARK__STORE__LINGER", "300ms".into()),
        // A caller's sampled traceparent is continued whatever the ratio.
        ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "0".into()),
    ]);
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
    let process = Process::start(&[
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.path().join("t.db").display())),
        ("TIDEMARK__KAFKA__ENABLED", "true".into()),
        ("TIDEMARK__INGEST__MODE", "kafka".into()),
        ("TIDEMARK__KAFKA__BROKERS", brokers),
        ("TIDEMARK__KAFKA__GROUP_ID", "traced".into()),
        ("TIDEMARK__PIPELINE__PARTITIONS", "2".into()),
        ("TIDEMARK__PIPELINE__WINDOW", "1s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".into()),
        ("TIDEMARK__TELEMETRY__OTLP_ENDPOINT", endpoint),
        ("TIDEMARK__TELEMETRY__OTLP_PROTOCOL", "http/protobuf".into()),
        ("TIDEMARK__TELEMETRY__SAMPLING_RATIO", "1".into()),
    ]);
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

    // No label carries a sensor id (bounded cardinality).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("traced-1") && !line.contains("sensor_id") && !line.contains("sensorId"), "{line}");
    }
    runtime.shutdown().await;
}
