//! Kafka mode on librdkafka's in-process cluster (`MockCluster`: the real Kafka protocol
//! over loopback TCP, so separate tidemark processes join it too), with the shared
//! checkpoints in PostgreSQL.

mod common;

use std::time::Duration;

use common::{Client, Process, comparable, eventually, fresh_postgres_database, sources, start};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::Value;
use sqlx::Row;
use tidemark::config::ConfigSources;
use tidemark::sim::SimConfig;

const TOPIC: &str = "sensor-events";
const PARTITIONS: i32 = 4;

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    cluster.create_topic(&format!("{TOPIC}.dlq"), 1, 1).expect("dlq topic");
    cluster.create_topic("predictions", 1, 1).expect("results topic");
    cluster.create_topic("alerts", 1, 1).expect("alerts topic");
    cluster
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

async fn produce(producer: &FutureProducer, lines: &[String]) {
    let deliveries: Vec<_> = lines
        .iter()
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("json");
            let key = event["sensorId"].as_str().unwrap_or_default().to_string();
            producer.send_result(FutureRecord::to(TOPIC).key(&key).payload(line)).expect("queued")
        })
        .collect();
    for delivery in deliveries {
        delivery.await.expect("delivered").expect("acknowledged");
    }
}

/// Settings every instance of a test shares (its group, its PostgreSQL database).
fn kafka_settings(brokers: &str, group: &str, store_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__KAFKA__ENABLED", "true".into()),
        ("TIDEMARK__INGEST__MODE", "kafka".into()),
        ("TIDEMARK__KAFKA__BROKERS", brokers.into()),
        ("TIDEMARK__KAFKA__GROUP_ID", group.into()),
        ("TIDEMARK__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000".into()),
        ("TIDEMARK__STORE__URL", store_url.into()),
        ("TIDEMARK__PIPELINE__PARTITIONS", PARTITIONS.to_string()),
        ("TIDEMARK__PIPELINE__WINDOW", "2s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".into()),
        ("TIDEMARK__PIPELINE__IDLE_TIMEOUT", "1h".into()),
        ("TIDEMARK__SCORING__WARMUP_WINDOWS", "2".into()),
        ("TIDEMARK__CHECKPOINT__INTERVAL", "300ms".into()),
        ("TIDEMARK__STORE__LINGER", "20ms".into()),
        ("TIDEMARK__SHUTDOWN__TIMEOUT", "20s".into()),
    ]
}

fn in_process(dir: &std::path::Path, settings: &[(&'static str, String)]) -> ConfigSources {
    let mut sources = sources(dir);
    for (key, value) in settings {
        let path = key.trim_start_matches("TIDEMARK__").to_lowercase().replacen("__", ".", 1).replacen("__", ".", 1);
        // What the environment's string means: a flag, a number, or text.
        sources = match (value.parse::<bool>(), value.parse::<i64>()) {
            (Ok(flag), _) => sources.with(&path, flag),
            (_, Ok(number)) => sources.with(&path, number),
            _ => sources.with(&path, value.as_str()),
        };
    }
    sources
}

fn workload(seconds: u64) -> Vec<String> {
    common::workload(SimConfig {
        sensors: 200,
        rate: 2000.0,
        duration: Some(Duration::from_secs(seconds)),
        seed: 9,
        disorder: 0.05,
        max_disorder: Duration::from_millis(800),
        anomalies: 4,
        anomalies_after: Duration::from_secs(seconds / 3),
        anomaly_duration: Duration::from_secs(4),
        ..SimConfig::default()
    })
}

async fn table(url: &str) -> Vec<String> {
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.expect("connect");
    let rows = sqlx::query(
        "SELECT sensor_id, event_type, (extract(epoch from window_start) * 1000)::bigint AS ws, event_count, avg_value, \
         min_value, max_value, stddev, prediction_score, anomaly, severity, revision FROM predictions",
    )
    .fetch_all(&mut connection)
    .await
    .expect("select");
    let values: Vec<Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "sensorId": row.get::<String, _>("sensor_id"), "eventType": row.get::<String, _>("event_type"),
                "windowStart": row.get::<i64, _>("ws"), "windowEnd": 0, "eventCount": row.get::<i64, _>("event_count"),
                "avgValue": row.get::<f64, _>("avg_value"), "minValue": row.get::<f64, _>("min_value"),
                "maxValue": row.get::<f64, _>("max_value"), "stddev": row.get::<f64, _>("stddev"),
                "predictionScore": row.get::<f64, _>("prediction_score"), "anomaly": row.get::<bool, _>("anomaly"),
                "severity": row.get::<String, _>("severity"), "revision": row.get::<i32, _>("revision"),
            })
        })
        .collect();
    comparable(&values)
}

async fn committed_total(url: &str) -> i64 {
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.expect("connect");
    sqlx::query("SELECT COALESCE(SUM(next_position), 0)::bigint FROM checkpoints")
        .fetch_one(&mut connection)
        .await
        .map(|row| row.get::<i64, _>(0))
        .unwrap_or(0)
}

/// Run the workload through one uninterrupted in-process instance: the reference table.
async fn baseline(brokers: &str, lines: &[String]) -> Vec<String> {
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(in_process(dir.path(), &kafka_settings(brokers, "baseline", &url))).await;
    eventually(Duration::from_secs(60), "the baseline consumed everything", || async {
        (committed_total(&url).await == lines.len() as i64).then_some(())
    })
    .await;
    runtime.shutdown().await;
    table(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instance_loses_and_duplicates_nothing() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let lines = workload(60);
    let producer = producer(&brokers);
    let url = fresh_postgres_database().await;
    let settings = kafka_settings(&brokers, "cluster", &url);

    let mut first = Process::start(&settings);
    let mut second = Process::start(&settings);
    let chunks: Vec<&[String]> = lines.chunks(lines.len() / 30 + 1).collect();
    let mut killed = false;
    let mut restarted = None;
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&producer, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if i == 10 {
            first.signal("KILL");
            first.wait(Duration::from_secs(5));
            killed = true;
        }
        if i == 20 {
            restarted = Some(Process::start(&settings));
        }
    }
    assert!(killed);
    let mut restarted = restarted.expect("restarted");
    // Every event reflected in a complete checkpoint: offsets of all partitions at the end.
    eventually(Duration::from_secs(90), "the group consumed everything", || async {
        (committed_total(&url).await == lines.len() as i64).then_some(())
    })
    .await;
    for process in [&mut second, &mut restarted] {
        process.signal("TERM");
        assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log());
    }
    let actual = table(&url).await;
    let expected = baseline(&brokers, &lines).await;
    assert!(expected.len() > 1000, "{} windows", expected.len());
    assert_eq!(actual.len(), expected.len(), "no window missing, none duplicated");
    assert_eq!(actual, expected, "the table equals an uninterrupted run, row for row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_joining_mid_stream_loses_and_duplicates_nothing() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let lines = workload(40);
    let producer = producer(&brokers);
    let url = fresh_postgres_database().await;
    let settings = kafka_settings(&brokers, "joiners", &url);

    let first_dir = tempfile::tempdir().expect("temp dir");
    let first = start(in_process(first_dir.path(), &settings)).await;
    let (head, tail) = lines.split_at(lines.len() / 2);
    produce(&producer, head).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second_dir = tempfile::tempdir().expect("temp dir");
    let second = start(in_process(second_dir.path(), &settings)).await;
    for chunk in tail.chunks(2000) {
        produce(&producer, chunk).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(Duration::from_secs(90), "both consumed everything", || async {
        (committed_total(&url).await == lines.len() as i64).then_some(())
    })
    .await;
    // Both instances own partitions now.
    let owned = |runtime: &tidemark::runtime::Runtime| {
        (0..PARTITIONS as u32).filter(|p| runtime.router().actor(*p).is_some()).count()
    };
    let (a, b) = (owned(&first), owned(&second));
    assert_eq!(a + b, PARTITIONS as usize, "every partition has one owner");
    assert!(a > 0 && b > 0, "the rebalance gave the newcomer partitions ({a} + {b})");
    first.shutdown().await;
    second.shutdown().await;
    let actual = table(&url).await;
    let expected = baseline(&brokers, &lines).await;
    assert_eq!(actual.len(), expected.len());
    assert_eq!(actual, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dead_letter_topic_and_the_source_goes_on() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let producer = producer(&brokers);
    let url = fresh_postgres_database().await;
    let mut settings = kafka_settings(&brokers, "dlq", &url);
    settings.push(("TIDEMARK__KAFKA__RESULTS_TOPIC", "predictions".into()));
    settings.push(("TIDEMARK__KAFKA__ALERTS_TOPIC", "alerts".into()));
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(in_process(dir.path(), &settings)).await;
    let client = Client::new(&runtime);

    let bad = ["{not json", r#"{"sensorId":"s-1","eventType":"t","value":"hot"}"#, r#"[{"sensorId":"s-1"}]"#];
    for (i, payload) in bad.iter().enumerate() {
        producer
            .send(
                FutureRecord::to(TOPIC).key("s-1").payload(*payload).partition(i as i32 % PARTITIONS),
                Duration::from_secs(5),
            )
            .await
            .expect("produced");
    }
    let good = workload(8);
    produce(&producer, &good).await;

    let dlq: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    dlq.subscribe(&[&format!("{TOPIC}.dlq")]).expect("subscribe");
    let mut reasons = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reasons.len() < bad.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = dlq.poll(Duration::from_millis(200)) {
            let headers = message.headers().expect("headers");
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).to_string())
                    .unwrap_or_default()
            };
            assert!(!header("tidemark.error").is_empty());
            assert_eq!(header("tidemark.source.topic"), TOPIC);
            assert!(header("tidemark.source.offset").parse::<i64>().is_ok());
            reasons.push((
                header("tidemark.reason"),
                String::from_utf8_lossy(message.payload().unwrap_or_default()).to_string(),
            ));
        }
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("invalid_value".to_string(), bad[2].to_string()),
            ("unparsable".to_string(), bad[0].to_string()),
            ("wrong_type".to_string(), bad[1].to_string()),
        ]
    );
    // The source went on: the good events are processed and their windows stored.
    eventually(Duration::from_secs(30), "the good events consumed", || async {
        let status = client.get_ok("/api/status").await;
        let lag: i64 = status["kafka"]["partitions"].as_array()?.iter().map(|p| p["lag"].as_i64().unwrap_or(1)).sum();
        (lag == 0 && client.get_ok("/api/predictions").await["count"].as_u64()? > 0).then_some(())
    })
    .await;
    let letters = client.get_ok("/api/dead-letters?limit=10").await;
    assert_eq!(letters["totalsByReason"]["unparsable"], 1, "{letters}");
    let results: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "results-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    results.subscribe(&["predictions"]).expect("subscribe");
    let record =
        (0..100).find_map(|_| results.poll(Duration::from_millis(200)).and_then(Result::ok).map(|m| m.detach()));
    let record = record.expect("window results on the results topic");
    let value: Value = serde_json::from_slice(record.payload().unwrap_or_default()).expect("JSON result");
    assert!(value["windowStart"].is_string() && value["eventCount"].as_u64() > Some(0), "{value}");
    assert_eq!(
        record.key().map(|k| String::from_utf8_lossy(k).to_string()),
        value["sensorId"].as_str().map(String::from)
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ingestion_answers_202_only_for_acknowledged_events() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("ingest.mode", "kafka")
            .with("kafka.brokers", brokers.as_str())
            .with("kafka.produce_timeout", "2s"),
    )
    .await;
    let client = Client::new(&runtime);
    let body = r#"[{"sensorId":"a","eventType":"t","value":1.5,"timestamp":1767225600000},
                   {"sensorId":"b","eventType":"t","value":2.5,"timestamp":1767225600001},
                   {"sensorId":"c","eventType":"t"}]"#;
    let (status, answer) = client.post("/api/events", "application/json", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["rejected"].as_u64()), (Some(2), Some(1)));

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "verify")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..100 {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let value: Value = serde_json::from_slice(message.payload().unwrap_or_default()).expect("json");
            assert_eq!(message.key(), value["sensorId"].as_str().map(str::as_bytes), "keyed by sensorId");
            seen.push(value["sensorId"].as_str().unwrap_or_default().to_string());
        }
        if seen.len() == 2 {
            break;
        }
    }
    seen.sort();
    assert_eq!(seen, vec!["a", "b"], "exactly the accepted events are on the topic");

    // The broker goes away: no false 202.
    cluster.broker_down(1).expect("broker down");
    let (status, answer) =
        client.post("/api/events", "application/json", r#"{"sensorId":"d","eventType":"t","value":1}"#).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "broker_unavailable");
    cluster.broker_up(1).expect("broker up");
    let _ = producer(&brokers).flush(Duration::from_secs(1));
    runtime.shutdown().await;
}
