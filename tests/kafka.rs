//! Kafka mode on librdkafka's mock cluster (`tidemark::sim::kafka::MockBroker`: the real
//! Kafka protocol over loopback TCP, so separate tidemark processes join it too), with the
//! shared checkpoints in PostgreSQL.
//!
//! The exactness tests run with the default window and checkpoint interval and compare
//! the `predictions` table with `tidemark replay` of the same events. Only the idle
//! timeout is shortened (10 s): it is what ends a bounded stream, firing the last window
//! of every sensor, as the replay's end of input does.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Client, Process, eventually, fresh_postgres_database, sources, start};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use sqlx::Row;
use tidemark::config::{Config, ConfigSources};
use tidemark::replay::{ReplayOptions, SinkKind};
use tidemark::sim::kafka::MockBroker;
use tidemark::sim::{AnomalyKind, SimConfig};

const TOPIC: &str = "sensor-events";
const PARTITIONS: i32 = 8;

struct Broker {
    mock: MockBroker,
    servers: String,
}

/// A broker whose groups form at once (Apache Kafka's `group.initial.rebalance.delay.ms`
/// is 3 s; tests that start several members together use [`broker_with_delay`]).
fn broker(partitions: i32) -> Broker {
    broker_with_delay(partitions, Duration::ZERO)
}

fn broker_with_delay(partitions: i32, initial_rebalance_delay: Duration) -> Broker {
    let topics = [
        (TOPIC.to_string(), partitions),
        (format!("{TOPIC}.dlq"), 1),
        ("predictions".to_string(), 1),
        ("alerts".to_string(), 1),
    ];
    let mock = MockBroker::start(1, &topics, initial_rebalance_delay).expect("mock cluster");
    let servers = mock.bootstrap_servers().expect("bootstrap servers");
    Broker { mock, servers }
}

/// A consumer of `topic` from its beginning, in its own group.
fn reader(brokers: &str, group: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer")
}

async fn produce(producer: &FutureProducer, lines: &[String]) {
    // In chunks the producer's local queue (100,000 messages) takes.
    for chunk in lines.chunks(20_000) {
        let deliveries: Vec<_> = chunk
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
}

/// Sensors reporting twice a second for `seconds` of event time, slightly out of order
/// (inside the default 5 s bound), with spikes, drifts and stuck values to score.
fn workload(sensors: u32, seconds: u64) -> Vec<String> {
    common::workload(SimConfig {
        sensors,
        rate: f64::from(sensors) * 2.0,
        duration: Some(Duration::from_secs(seconds)),
        seed: 11,
        disorder: 0.05,
        max_disorder: Duration::from_secs(2),
        anomalies: 6,
        anomalies_after: Duration::from_secs(seconds / 2),
        anomaly_duration: Duration::from_secs(20),
        anomaly_kinds: vec![AnomalyKind::Spike, AnomalyKind::Drift, AnomalyKind::Stuck],
        ..SimConfig::default()
    })
}

/// Defaults, except what a test must set: Kafka, the shared store, the partition
/// count of the topic, and the idle timeout that ends the bounded stream.
fn kafka_settings(brokers: &str, group: &str, store_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__KAFKA__ENABLED", "true".into()),
        ("TIDEMARK__INGEST__MODE", "kafka".into()),
        ("TIDEMARK__KAFKA__BROKERS", brokers.into()),
        ("TIDEMARK__KAFKA__GROUP_ID", group.into()),
        ("TIDEMARK__STORE__URL", store_url.into()),
        ("TIDEMARK__PIPELINE__PARTITIONS", PARTITIONS.to_string()),
        ("TIDEMARK__PIPELINE__IDLE_TIMEOUT", "10s".into()),
    ]
}

fn in_process(dir: &std::path::Path, settings: &[(&'static str, String)]) -> ConfigSources {
    let mut sources = sources(dir).with("checkpoint.interval", "5s").with("store.linger", "2ms");
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

/// Every prediction row on the fields that must not change with faults or restarts.
async fn table(url: &str) -> Vec<String> {
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.expect("connect");
    let rows = sqlx::query(
        "SELECT sensor_id, event_type, (extract(epoch from window_start) * 1000)::bigint AS ws, event_count, avg_value, \
         min_value, max_value, stddev, prediction_score, anomaly, severity, revision FROM predictions",
    )
    .fetch_all(&mut connection)
    .await
    .expect("select");
    let mut rows: Vec<String> = rows
        .iter()
        .map(|row| {
            serde_json::json!([
                row.get::<String, _>("sensor_id"),
                row.get::<String, _>("event_type"),
                row.get::<i64, _>("ws"),
                row.get::<i64, _>("event_count"),
                row.get::<f64, _>("avg_value"),
                row.get::<f64, _>("min_value"),
                row.get::<f64, _>("max_value"),
                row.get::<f64, _>("stddev"),
                row.get::<f64, _>("prediction_score"),
                row.get::<bool, _>("anomaly"),
                row.get::<String, _>("severity"),
                row.get::<i32, _>("revision"),
            ])
            .to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// `tidemark replay` of the same events into a fresh database: the reference table.
async fn replay_table(lines: &[String]) -> Vec<String> {
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("events.ndjson");
    let mut out = std::fs::File::create(&file).expect("file");
    for line in lines {
        writeln!(out, "{line}").expect("write");
    }
    let config = Config::load(
        &ConfigSources::default()
            .with("store.url", url.as_str())
            .with("pipeline.partitions", i64::from(PARTITIONS))
            .with("pipeline.idle_timeout", "10s")
            .with("log.level", "warn"),
    )
    .expect("config");
    let options = ReplayOptions { input: file, output: None, dead_letters: None, sink: SinkKind::Store, parsers: 2 };
    let report = tidemark::replay::run(config, options).await.expect("replay");
    assert_eq!(report.events, lines.len() as u64);
    assert_eq!(report.late, 0, "the workload has no late events");
    table(&url).await
}

/// Wait until the table equals `expected` (the last windows fire on the idle timeout).
async fn wait_for_table(url: &str, expected: &[String], timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let actual = table(url).await;
        if actual == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let missing = expected.iter().filter(|row| !actual.contains(row)).count();
            let extra: Vec<&String> = actual.iter().filter(|row| !expected.contains(row)).take(5).collect();
            let sample: Vec<&String> = expected.iter().filter(|row| !actual.contains(row)).take(5).collect();
            panic!(
                "after {timeout:?} the table has {} rows, the replay {}; {missing} expected rows missing or \
                 different, e.g. {sample:#?}; rows not in the replay, e.g. {extra:#?}",
                actual.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The checkpoints account for every offset: processed + dead-lettered + skipped =
/// consumed, over all partitions, and every produced event was processed once.
async fn assert_accounting(url: &str, produced: usize) {
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.expect("connect");
    let row = sqlx::query(
        "SELECT COALESCE(SUM(next_position - base_position), 0)::bigint AS consumed, \
         COALESCE(SUM(events_processed), 0)::bigint AS processed, COALESCE(SUM(dead_lettered), 0)::bigint AS dead, \
         COALESCE(SUM(skipped), 0)::bigint AS skipped FROM checkpoints",
    )
    .fetch_one(&mut connection)
    .await
    .expect("select");
    let (consumed, processed, dead, skipped): (i64, i64, i64, i64) =
        (row.get("consumed"), row.get("processed"), row.get("dead"), row.get("skipped"));
    assert_eq!(consumed, processed + dead + skipped, "consumed = processed + dead-lettered + skipped");
    assert_eq!((processed, dead, skipped), (produced as i64, 0, 0), "every event processed exactly once");
}

/// `/api/status` of a running instance shows the same identity per partition it owns.
async fn assert_status_identity(client: &Client) {
    let status = client.get_ok("/api/status").await;
    for partition in status["partitions"].as_array().cloned().unwrap_or_default() {
        let positions = &partition["positions"];
        let consumed = positions["consumed"].as_u64().unwrap_or(u64::MAX);
        let accounted: u64 =
            ["processed", "deadLettered", "skipped"].iter().map(|k| positions[k].as_u64().unwrap_or(0)).sum();
        assert_eq!(consumed, accounted, "partition {}: {positions}", partition["partition"]);
    }
}

/// Wait until the checkpoints cover `produced` offsets.
async fn wait_for_checkpoints(url: &str, produced: usize, timeout: Duration) {
    eventually(timeout, "checkpoints covering every offset", || async {
        let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(url).await.ok()?;
        let covered: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(next_position), 0)::bigint FROM checkpoints")
            .fetch_one(&mut connection)
            .await
            .ok()?;
        (covered == produced as i64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_consumed_by_one_instance_equals_replay() {
    let broker = broker(PARTITIONS);
    let lines = workload(400, 150);
    assert!(lines.len() >= 100_000, "{} events", lines.len());
    produce(&producer(&broker.servers), &lines).await;
    let expected = replay_table(&lines).await;
    // A backlog older than the idle timeout: no key may count as idle while its events
    // are still waiting in the topic.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(in_process(dir.path(), &kafka_settings(&broker.servers, "backlog", &url))).await;
    let client = Client::new(&runtime);
    eventually(Duration::from_secs(30), "ready", || async { (client.get("/ready").await.0 == 200).then_some(()) })
        .await;
    wait_for_table(&url, &expected, Duration::from_secs(120)).await;
    assert_status_identity(&client).await;
    let late = client.get_ok("/api/dead-letters?reason=late").await;
    assert_eq!(late["count"], 0, "nothing lost to late: {late}");
    runtime.shutdown().await;
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_member_sigkilled_while_behind_loses_and_duplicates_nothing() {
    // Both members join within the broker's initial delay and split the backlog.
    let broker = broker_with_delay(PARTITIONS, Duration::from_secs(3));
    let lines = workload(400, 250);
    let (backlog, rest) = lines.split_at(lines.len() * 3 / 5);
    let producer = producer(&broker.servers);
    produce(&producer, backlog).await;
    let expected = replay_table(&lines).await;
    // A slower broker (every request takes 30 ms more): the members take seconds over
    // the backlog, so the victim is surely behind when it is killed.
    broker.mock.control("rtt 1 30").expect("broker round-trip time");

    let url = fresh_postgres_database().await;
    let settings = kafka_settings(&broker.servers, "members", &url);
    let starting = {
        let settings = settings.clone();
        std::thread::spawn(move || Process::start(&settings))
    };
    let mut victim = Process::start(&settings);
    let survivor = starting.join().expect("survivor started");
    let victim_client = victim.client();
    // Kill the victim once it is consuming its partitions and still behind on them.
    eventually(Duration::from_secs(30), "the victim consuming its partitions, behind", || async {
        let status = victim_client.get_ok("/api/status").await;
        let partitions = status["kafka"]["partitions"].as_array()?.clone();
        let started = partitions.iter().any(|p| p["processed"].as_i64() > Some(0));
        let behind = partitions.iter().any(|p| {
            let high = p["highWatermark"].as_i64().unwrap_or(-1);
            high > 0 && p["processed"].as_i64().is_some_and(|processed| processed < high)
        });
        (started && behind).then_some(())
    })
    .await;
    victim.signal("KILL");
    victim.wait(Duration::from_secs(5));
    for chunk in rest.chunks(rest.len() / 4 + 1) {
        produce(&producer, chunk).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let restarted = Process::start(&settings);
    wait_for_table(&url, &expected, Duration::from_secs(150)).await;
    let mut owned = Vec::new();
    for process in [&survivor, &restarted] {
        let client = process.client();
        assert_eq!(client.get("/ready").await.0, 200, "each member is ready with its own partitions");
        assert_status_identity(&client).await;
        let status = client.get_ok("/api/status").await;
        owned.push(status["kafka"]["partitions"].as_array().map_or(0, Vec::len));
    }
    assert_eq!(owned.iter().sum::<usize>(), PARTITIONS as usize, "every partition has one owner: {owned:?}");
    assert!(owned.iter().all(|&n| n > 0), "the restarted member got partitions back: {owned:?}");
    for mut process in [survivor, restarted] {
        process.signal("TERM");
        assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log());
    }
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_third_member_joining_and_leaving_mid_stream_changes_nothing() {
    let broker = broker(PARTITIONS);
    let lines = workload(400, 150);
    let expected = replay_table(&lines).await;
    let url = fresh_postgres_database().await;
    let settings = kafka_settings(&broker.servers, "three", &url);
    let producer = producer(&broker.servers);
    let first = Process::start(&settings);
    let second = Process::start(&settings);
    let chunks: Vec<&[String]> = lines.chunks(lines.len() / 20 + 1).collect();
    let mut third = None;
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&producer, chunk).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        if i == 5 {
            let joining = Process::start(&settings);
            let client = joining.client();
            eventually(Duration::from_secs(30), "the third member getting partitions", || async {
                let status = client.get_ok("/api/status").await;
                (!status["kafka"]["partitions"].as_array()?.is_empty()).then_some(())
            })
            .await;
            third = Some(joining);
        }
        if i == 12
            && let Some(mut leaving) = third.take()
        {
            leaving.signal("TERM");
            assert!(leaving.wait(Duration::from_secs(30)).success(), "{}", leaving.log());
        }
    }
    wait_for_table(&url, &expected, Duration::from_secs(120)).await;
    for process in [&first, &second] {
        let client = process.client();
        assert_eq!(client.get("/ready").await.0, 200);
        assert_status_identity(&client).await;
    }
    for mut process in [first, second] {
        process.signal("TERM");
        assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log());
    }
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_the_broker_down_for_ten_seconds_loses_and_duplicates_nothing() {
    let broker = broker(PARTITIONS);
    let lines = workload(400, 150);
    let expected = replay_table(&lines).await;
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The default idle timeout (60 s): with the 10 s of the other tests, a producer that
    // reconnects slowly after the outage (librdkafka backs off up to 10 s) delivers the
    // rest after the consumer has seen its keys idle for that long, and idle flushing —
    // processing-time idleness by definition — rightly closes their windows first.
    let mut settings = kafka_settings(&broker.servers, "outage", &url);
    settings.retain(|(key, _)| *key != "TIDEMARK__PIPELINE__IDLE_TIMEOUT");
    let runtime = start(in_process(dir.path(), &settings)).await;
    let client = Client::new(&runtime);
    let producer = producer(&broker.servers);
    let (head, tail) = lines.split_at(lines.len() / 2);
    produce(&producer, head).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.mock.control("down 1").expect("broker down");
    // Produce the rest while the broker is down: librdkafka keeps retrying.
    let late_producer = producer.clone();
    let tail_lines = tail.to_vec();
    let producing = tokio::spawn(async move { produce(&late_producer, &tail_lines).await });
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.mock.control("up 1").expect("broker up");
    producing.await.expect("produced after the outage");
    wait_for_table(&url, &expected, Duration::from_secs(150)).await;
    let late = client.get_ok("/api/dead-letters?reason=late").await;
    assert_eq!(late["count"], 0, "nothing lost to late: {late}");
    assert_status_identity(&client).await;
    runtime.shutdown().await;
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dead_letter_topic_and_the_source_goes_on() {
    let broker = broker(4);
    let brokers = broker.servers.clone();
    let producer = producer(&brokers);
    let url = fresh_postgres_database().await;
    let mut settings = kafka_settings(&brokers, "dlq", &url);
    settings.retain(|(key, _)| *key != "TIDEMARK__PIPELINE__PARTITIONS");
    settings.push(("TIDEMARK__PIPELINE__PARTITIONS", "4".into()));
    settings.push(("TIDEMARK__PIPELINE__WINDOW", "2s".into()));
    settings.push(("TIDEMARK__KAFKA__RESULTS_TOPIC", "predictions".into()));
    settings.push(("TIDEMARK__KAFKA__ALERTS_TOPIC", "alerts".into()));
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(in_process(dir.path(), &settings)).await;
    let client = Client::new(&runtime);

    let bad = ["{not json", r#"{"sensorId":"s-1","eventType":"t","value":"hot"}"#, r#"[{"sensorId":"s-1"}]"#];
    for (i, payload) in bad.iter().enumerate() {
        producer
            .send(FutureRecord::to(TOPIC).key("s-1").payload(*payload).partition(i as i32), Duration::from_secs(5))
            .await
            .expect("produced");
    }
    let good = workload(50, 20);
    produce(&producer, &good).await;

    let dlq = reader(&brokers, "dlq-reader", &format!("{TOPIC}.dlq"));
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
    // The source went on: every good event processed; the bad ones are accounted as
    // dead-lettered at their offsets.
    eventually(Duration::from_secs(30), "the good events consumed", || async {
        let status = client.get_ok("/api/status").await;
        let positions: Vec<Value> = status["partitions"].as_array()?.iter().map(|p| p["positions"].clone()).collect();
        let processed: u64 = positions.iter().filter_map(|p| p["processed"].as_u64()).sum();
        let dead: u64 = positions.iter().filter_map(|p| p["deadLettered"].as_u64()).sum();
        (processed == good.len() as u64 && dead == bad.len() as u64).then_some(())
    })
    .await;
    assert_status_identity(&client).await;
    eventually(Duration::from_secs(30), "dead letters stored", || async {
        let letters = client.get_ok("/api/dead-letters?limit=10").await;
        (letters["totalsByReason"]["unparsable"] == 1 && letters["totalsByReason"]["wrong_type"] == 1).then_some(())
    })
    .await;
    let results = reader(&brokers, "results-reader", "predictions");
    let record =
        (0..150).find_map(|_| results.poll(Duration::from_millis(200)).and_then(Result::ok).map(|m| m.detach()));
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
    let broker = broker(4);
    let brokers = broker.servers.clone();
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

    let consumer = reader(&brokers, "verify", TOPIC);
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
    broker.mock.control("down 1").expect("broker down");
    let (status, answer) =
        client.post("/api/events", "application/json", r#"{"sensorId":"d","eventType":"t","value":1}"#).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "broker_unavailable");
    broker.mock.control("up 1").expect("broker up");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_count_mismatch_is_refused_naming_both_numbers() {
    let broker = broker(PARTITIONS);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = common::config(
        sources(dir.path())
            .with("kafka.enabled", true)
            .with("ingest.mode", "kafka")
            .with("kafka.brokers", broker.servers.as_str())
            .with("pipeline.partitions", 4),
    );
    let error = match tidemark::runtime::Runtime::start(config).await {
        Ok(runtime) => {
            runtime.shutdown().await;
            panic!("started against a topic with another partition count");
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("has 8 partitions") && error.contains("pipeline.partitions is 4"), "{error}");
}

/// Produce `count` events to `topic`, uncompressed and padded, so the mock broker's
/// retention (5 MB per partition) deletes the oldest ones.
async fn produce_padded(brokers: &str, topic: &str, first: usize, count: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("compression.type", "none")
        .create()
        .expect("producer");
    let pad = "x".repeat(400);
    for chunk_start in (first..first + count).step_by(10_000) {
        let deliveries: Vec<_> = (chunk_start..(chunk_start + 10_000).min(first + count))
            .map(|i| {
                let payload = format!(
                    r#"{{"sensorId":"s-{}","eventType":"t","value":{i},"timestamp":{},"note":"{pad}"}}"#,
                    i % 10,
                    1_767_225_600_000i64 + i as i64 * 10
                );
                producer.send_result(FutureRecord::to(topic).key("k").payload(&payload)).expect("queued")
            })
            .collect();
        for delivery in deliveries {
            delivery.await.expect("delivered").expect("acknowledged");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_gap_is_logged_counted_and_dead_lettered() {
    let broker = broker(PARTITIONS);
    broker.mock.control("topic retained 1").expect("topic");
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = sources(dir.path())
        .with("kafka.enabled", true)
        .with("ingest.mode", "kafka")
        .with("kafka.brokers", broker.servers.as_str())
        .with("kafka.topic", "retained")
        .with("kafka.group_id", "retention")
        .with("pipeline.partitions", 1);
    produce_padded(&broker.servers, "retained", 0, 1_000).await;
    let runtime = start(settings.clone()).await;
    let client = Client::new(&runtime);
    eventually(Duration::from_secs(30), "the first 1,000 processed", || async {
        let status = client.get_ok("/api/status").await;
        (status["partitions"][0]["positions"]["processed"] == 1000).then_some(())
    })
    .await;
    runtime.shutdown().await;

    // While tidemark is stopped, enough is produced for retention to delete the offsets
    // after its checkpoint (1,000) before it reads them.
    produce_padded(&broker.servers, "retained", 1_000, 20_000).await;
    let reader: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &broker.servers).create().expect("client");
    let (low, high) = reader.fetch_watermarks("retained", 0, Duration::from_secs(5)).expect("watermarks");
    assert!(low > 1_000, "retention deleted offsets after the checkpoint: log starts at {low}");

    let runtime = start(settings).await;
    let client = Client::new(&runtime);
    let lost = (low - 1_000) as u64;
    eventually(Duration::from_secs(60), "the rest processed", || async {
        let status = client.get_ok("/api/status").await;
        (status["partitions"][0]["positions"]["consumed"] == high as u64).then_some(())
    })
    .await;
    let status = client.get_ok("/api/status").await;
    let positions = &status["partitions"][0]["positions"];
    assert_eq!(positions["skipped"], lost, "{positions}");
    assert_eq!(positions["processed"].as_u64(), Some(high as u64 - lost), "{positions}");
    assert_eq!(status["kafka"]["partitions"][0]["offsetsSkipped"], lost);
    assert_status_identity(&client).await;
    let letters = eventually(Duration::from_secs(10), "the retention gap dead letter", || async {
        let letters = client.get_ok("/api/dead-letters?reason=retention_gap").await;
        (letters["count"] == 1).then_some(letters)
    })
    .await;
    let error = letters["items"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(&format!("offsets 1000..{low}")) && error.contains("retention"), "{error}");
    let metrics = client.get("/metrics").await.1.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains(&format!("tidemark_kafka_offsets_skipped_total{{partition=\"0\"}} {lost}")), "{metrics}");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_partition_tree_takes_its_kafka_partitions_back() {
    let broker = broker(PARTITIONS);
    let lines = workload(200, 150);
    let expected = replay_table(&lines).await;
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(in_process(dir.path(), &kafka_settings(&broker.servers, "redrive", &url))).await;
    let client = Client::new(&runtime);
    let producer = producer(&broker.servers);
    let (head, tail) = lines.split_at(lines.len() / 2);
    produce(&producer, head).await;
    eventually(Duration::from_secs(30), "the first half processed", || async {
        let status = client.get_ok("/api/status").await;
        let processed: u64 =
            status["partitions"].as_array()?.iter().filter_map(|p| p["positions"]["processed"].as_u64()).sum();
        (processed == head.len() as u64).then_some(())
    })
    .await;
    // The whole partition tree goes (as when it escalates); the root starts a new one,
    // which must get the instance's Kafka partitions back from their checkpoints.
    let supervisor = runtime.partition_supervisor().expect("partition supervisor");
    supervisor.kill();
    eventually(Duration::from_secs(30), "a new partition supervisor with its partitions", || async {
        let restarted = runtime.partition_supervisor().is_some_and(|s| s.get_id() != supervisor.get_id());
        (restarted && client.get("/ready").await.0 == 200).then_some(())
    })
    .await;
    produce(&producer, tail).await;
    wait_for_table(&url, &expected, Duration::from_secs(120)).await;
    assert_status_identity(&client).await;
    runtime.shutdown().await;
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_quarantined_by_offset_and_the_partition_goes_on() {
    let broker = broker(PARTITIONS);
    let lines = workload(100, 60);
    let (head, tail) = lines.split_at(lines.len() / 2);
    let producer = producer(&broker.servers);
    produce(&producer, head).await;
    let poison = r#"{"sensorId":"poison","eventType":"temperature","value":1.0,"timestamp":1767225630000}"#;
    produce(&producer, &[poison.to_string()]).await;
    produce(&producer, tail).await;
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        in_process(dir.path(), &kafka_settings(&broker.servers, "poison", &url))
            .with("chaos.poison_sensor_id", "poison"),
    )
    .await;
    let client = Client::new(&runtime);
    let letter = eventually(Duration::from_secs(60), "the poison message in the dead-letter store", || async {
        let body = client.get_ok("/api/dead-letters?reason=poison").await;
        (body["count"] == 1).then(|| body["items"][0].clone())
    })
    .await;
    assert_eq!(letter["sensorId"], "poison");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(error.contains("crashed partition") && error.contains("chaos: poison event"), "{error}");
    eventually(Duration::from_secs(60), "every other message processed", || async {
        let status = client.get_ok("/api/status").await;
        let positions: Vec<Value> = status["partitions"].as_array()?.iter().map(|p| p["positions"].clone()).collect();
        let processed: u64 = positions.iter().filter_map(|p| p["processed"].as_u64()).sum();
        let dead: u64 = positions.iter().filter_map(|p| p["deadLettered"].as_u64()).sum();
        (processed == lines.len() as u64 && dead == 1).then_some(())
    })
    .await;
    assert_status_identity(&client).await;
    assert_eq!(client.get("/ready").await.0, 200, "the partition went on");
    runtime.shutdown().await;
}

fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_pauses_consumption_with_flat_memory_and_loses_nothing() {
    let broker = broker(PARTITIONS);
    let lines = workload(400, 300);
    let (backlog, during) = lines.split_at(lines.len() * 2 / 3);
    let producer = producer(&broker.servers);
    produce(&producer, backlog).await;
    let expected = replay_table(&lines).await;

    let server = common::PrivatePostgres::start();
    let bound = 65_536usize;
    let share = bound / PARTITIONS as usize;
    let mut settings = kafka_settings(&broker.servers, "outage", &server.url());
    settings.push(("TIDEMARK__PIPELINE__MAX_BUFFERED_EVENTS", bound.to_string()));
    settings.push(("TIDEMARK__STORE__STATEMENT_TIMEOUT", "2s".into()));
    let process = Process::start(&settings);
    let client = process.client();
    eventually(Duration::from_secs(30), "consumption under way", || async {
        let status = client.get_ok("/api/status").await;
        let processed: u64 =
            status["kafka"]["partitions"].as_array()?.iter().filter_map(|p| p["processed"].as_u64()).sum();
        (processed > 0).then_some(())
    })
    .await;
    server.stop();
    produce(&producer, during).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, ready) = client.get("/ready").await;
    assert_eq!(status, 503, "not ready while PostgreSQL is down: {ready}");
    assert!(ready["problems"].to_string().contains("store"), "{ready}");
    let start_kib = resident_kib(process.child.id());
    let mut peak_kib = start_kib;
    for _ in 0..17 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_kib = peak_kib.max(resident_kib(process.child.id()));
        let status = client.get_ok("/api/status").await;
        for partition in status["kafka"]["partitions"].as_array().cloned().unwrap_or_default() {
            let unconfirmed = partition["unconfirmed"].as_u64().unwrap_or(u64::MAX) as usize;
            // Paused at the share; what was fetched before the pause still arrives.
            assert!(unconfirmed <= share * 2, "partition beyond its bound: {partition}");
        }
    }
    let status = client.get_ok("/api/status").await;
    let paused =
        status["kafka"]["partitions"].as_array().map_or(0, |p| p.iter().filter(|p| p["paused"] == true).count());
    assert!(paused > 0, "partitions with a backlog are paused while checkpoints cannot complete: {status}");
    eprintln!("resident memory through the store outage: {start_kib} KiB at its start, {peak_kib} KiB at the peak");
    assert!(
        peak_kib < start_kib + 64 * 1024,
        "memory flat through the outage: {start_kib} KiB at its start, {peak_kib} KiB at the peak"
    );
    server.resume();
    wait_for_table(&server.url(), &expected, Duration::from_secs(150)).await;
    assert_status_identity(&client).await;
    let mut process = process;
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log());
    wait_for_checkpoints(&server.url(), lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&server.url(), lines.len()).await;
}

#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_poll_thread_fails_the_source_loudly_and_it_recovers() {
    let broker = broker(PARTITIONS);
    let lines = workload(200, 150);
    produce(&producer(&broker.servers), &lines).await;
    let expected = replay_table(&lines).await;
    let url = fresh_postgres_database().await;
    let mut settings = kafka_settings(&broker.servers, "panic", &url);
    settings.push(("TIDEMARK__CHAOS__SOURCE_PANIC_AFTER_MESSAGES", (lines.len() / 2).to_string()));
    let process = Process::start(&settings);
    let client = process.client();
    wait_for_table(&url, &expected, Duration::from_secs(120)).await;
    let log = process.log();
    assert!(log.contains("the poll thread panicked") && log.contains("kafka source failed"), "{log}");
    let metrics = client.get("/metrics").await.1.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("tidemark_actor_restarts_total{actor=\"source-kafka\"} 1"), "{metrics}");
    assert_status_identity(&client).await;
    let mut process = process;
    process.signal("TERM");
    assert!(process.wait(Duration::from_secs(30)).success(), "{}", process.log());
    wait_for_checkpoints(&url, lines.len(), Duration::from_secs(5)).await;
    assert_accounting(&url, lines.len()).await;
}

/// Results to an output topic and to Elasticsearch at once: checkpoints pass through the
/// Kafka sink, then the Elasticsearch sink, then the store — every window in the table is
/// in the cluster (equal) and on the results topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_output_topic_and_elasticsearch_with_the_table() {
    let broker = broker(PARTITIONS);
    let lines = workload(100, 60);
    produce(&producer(&broker.servers), &lines).await;
    let expected = replay_table(&lines).await;
    let double =
        tidemark::sim::es_double::EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in");
    let url = fresh_postgres_database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        in_process(dir.path(), &kafka_settings(&broker.servers, "outputs", &url))
            .with("kafka.results_topic", "predictions")
            .with("kafka.alerts_topic", "alerts")
            // An alert per key (its windows hold events), whatever the model makes of them.
            .with("rules.busy.kind", "threshold")
            .with("rules.busy.stat", "count")
            .with("rules.busy.above", 0.0)
            .with("elasticsearch.enabled", true)
            .with("elasticsearch.urls", vec![double.url()]),
    )
    .await;
    let client = Client::new(&runtime);
    wait_for_table(&url, &expected, Duration::from_secs(120)).await;
    let rows = common::all_predictions(&client).await;
    eventually(Duration::from_secs(30), "the cluster to equal the table", || async {
        double.refresh();
        let docs: Vec<Value> = double.documents("tidemark-predictions").into_iter().map(|(_, _, doc)| doc).collect();
        (common::comparable(&docs) == common::comparable(&rows)).then_some(())
    })
    .await;
    let consumer = reader(&broker.servers, "outputs-check", "predictions");
    let mut keys = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while keys.len() < rows.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let record: Value = serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON record");
            keys.insert(format!("{}|{}|{}", record["sensorId"], record["eventType"], record["windowStart"]));
        }
    }
    assert_eq!(keys.len(), rows.len(), "every window on the results topic");

    // Every alert in the store is on the alerts topic, its last record in the stored state.
    let stored = client.get_ok("/api/alerts?limit=1000").await;
    let alert_key = |a: &Value| format!("{}|{}|{}|{}", a["rule"], a["sensorId"], a["eventType"], a["startedAt"]);
    let expected: std::collections::BTreeMap<String, Value> =
        stored["items"].as_array().into_iter().flatten().map(|a| (alert_key(a), a["state"].clone())).collect();
    assert!(expected.len() >= 100, "an alert per sensor at least: {stored}");
    let consumer = reader(&broker.servers, "alerts-check", "alerts");
    let mut states = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while states != expected && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let record: Value = serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON record");
            assert_eq!(message.key(), record["sensorId"].as_str().map(str::as_bytes), "keyed by sensorId");
            states.insert(alert_key(&record), record["state"].clone());
        }
    }
    assert_eq!(states, expected, "the alerts topic holds every stored alert, in its last state");
    runtime.shutdown().await;
}
