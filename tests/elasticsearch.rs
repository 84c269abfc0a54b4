//! The Elasticsearch sink against the protocol-level stand-in (`tidemark::sim::es_double`;
//! no Elasticsearch server can run on the test machines), through the real client and
//! injected faults: items refused for their content, 429 items and answers, 503s,
//! connection resets before and after a bulk request is applied, slow answers, and the
//! node down for 20 s while ingestion goes on. The result: every window in the cluster
//! exactly once and equal to the store, the refused ones in the dead letters with
//! Elasticsearch's reason, `/ready` saying so during the outage and memory bounded by
//! backpressure.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Client, eventually, post_batches, post_batches_counting, resident_bytes, sources, start, workload};
use serde_json::Value;
use tidemark::sim::SimConfig;
use tidemark::sim::es_double::EsDouble;

const REJECTED_SENSOR: &str = "sensor-0003";

fn window_key(row: &Value) -> String {
    format!(
        "{}|{}|{}",
        row["sensorId"].as_str().unwrap_or(""),
        row["eventType"].as_str().unwrap_or(""),
        row["windowStart"].as_str().unwrap_or("")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_reaches_elasticsearch_exactly_once_through_faults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in starts");
    *double.faults.reject_sensor_containing.lock() = Some(REJECTED_SENSOR.to_string());
    let runtime = start(
        sources(dir.path())
            .with("pipeline.window", "2s")
            .with("pipeline.max_out_of_orderness", "1s")
            .with("pipeline.idle_timeout", "1h")
            // A small buffer so that a 20 s outage reaches it in a test.
            .with("pipeline.max_buffered_events", 20_000)
            .with("elasticsearch.enabled", true)
            .with("elasticsearch.urls", vec![double.url()])
            .with("elasticsearch.index", "tidemark-predictions-%Y.%m.%d")
            .with("elasticsearch.linger", "20ms")
            .with("elasticsearch.request_timeout", "3s")
            .with("elasticsearch.max_backoff", "1s"),
    )
    .await;
    let client = Client::new(&runtime);
    let lines = workload(SimConfig {
        sensors: 40,
        rate: 2000.0,
        duration: Some(Duration::from_secs(60)),
        seed: 5,
        anomalies: 4,
        anomalies_after: Duration::from_secs(20),
        anomaly_duration: Duration::from_secs(5),
        ..SimConfig::default()
    });
    let quarter = lines.len() / 4;

    // 1: 429 items, 429 and 503 answers, resets before and after a request is applied.
    double.faults.item_429_every.store(5, Ordering::SeqCst);
    double.faults.http_429_next.store(4, Ordering::SeqCst);
    double.faults.http_503_next.store(2, Ordering::SeqCst);
    double.faults.reset_next.store(3, Ordering::SeqCst);
    double.faults.reset_after_apply_next.store(3, Ordering::SeqCst);
    post_batches(&client, &lines[..quarter], 1000, Duration::from_millis(100)).await;
    eventually(Duration::from_secs(30), "the injected faults to fire", || async {
        let f = &double.faults;
        (f.http_429_next.load(Ordering::SeqCst) == 0
            && f.reset_next.load(Ordering::SeqCst) == 0
            && f.reset_after_apply_next.load(Ordering::SeqCst) == 0)
            .then_some(())
    })
    .await;
    double.faults.item_429_every.store(0, Ordering::SeqCst);

    // 2: slow answers.
    double.faults.delay_ms.store(700, Ordering::SeqCst);
    post_batches(&client, &lines[quarter..2 * quarter], 1000, Duration::from_millis(100)).await;
    double.faults.delay_ms.store(0, Ordering::SeqCst);

    // 3: the node down for 20 s while ingestion goes on.
    double.set_down();
    let down_at = Instant::now();
    let loader = {
        let client = Client::new(&runtime);
        let batch: Vec<String> = lines[2 * quarter..].to_vec();
        tokio::spawn(async move { post_batches_counting(&client, &batch, 500, Duration::from_millis(200)).await })
    };
    let mut not_ready = false;
    let mut samples = Vec::new();
    while down_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, body) = client.get("/ready").await;
        if status == 503 && body.to_string().contains("elasticsearch") {
            not_ready = true;
        }
        samples.push(resident_bytes());
        let status = client.get_ok("/api/status").await;
        eprintln!("outage {:>2}s: {} events buffered", down_at.elapsed().as_secs(), status["replayBufferEvents"]);
    }
    double.set_up();
    assert!(not_ready, "/ready should name elasticsearch while the node is down");
    // Flat once the buffer is full: the last 10 s of the outage grow less than 48 MiB.
    let growth = samples[samples.len() - 1].saturating_sub(samples[samples.len() / 2]);
    eprintln!(
        "resident memory during the outage (MiB): {:?}",
        samples.iter().map(|b| b / (1 << 20)).collect::<Vec<_>>()
    );
    assert!(growth < 48 << 20, "memory grew {} MiB in the second half of the outage", growth >> 20);
    let (_, refused) = loader.await.expect("loader");
    assert!(refused > 0, "ingestion should backpressure (503) once the buffer holds what the outage blocks");

    // Everything in the store is in the cluster exactly once, except the refused sensor,
    // whose windows are dead letters with Elasticsearch's reason.
    let (store_rows, es_rows) = eventually(Duration::from_secs(90), "the cluster to match the store", || {
        let client = &client;
        let double = double.clone();
        async move {
            let rows = common::all_predictions(client).await;
            double.refresh();
            let docs = double.documents("tidemark-predictions-*");
            let accepted: Vec<Value> = rows.iter().filter(|row| row["sensorId"] != REJECTED_SENSOR).cloned().collect();
            let in_es: Vec<Value> = docs.into_iter().map(|(_, _, source)| source).collect();
            (common::comparable(&accepted) == common::comparable(&in_es) && accepted.len() > 500)
                .then_some((rows, in_es))
        }
    })
    .await;
    let ids: BTreeSet<String> = es_rows.iter().map(window_key).collect();
    assert_eq!(ids.len(), es_rows.len(), "a window indexed twice");
    assert!(es_rows.iter().all(|doc| doc["sensorId"] != REJECTED_SENSOR));

    let rejected: BTreeSet<String> = store_rows
        .iter()
        .filter(|row| row["sensorId"] == REJECTED_SENSOR)
        .map(|row| format!("{}|{}", row["eventType"].as_str().unwrap_or(""), row["windowStart"].as_str().unwrap_or("")))
        .collect();
    assert!(!rejected.is_empty());
    let letters = client.get_ok("/api/dead-letters?reason=elasticsearch_rejected&limit=1000").await;
    let letters = letters["items"].as_array().cloned().unwrap_or_default();
    for letter in &letters {
        assert_eq!(letter["sensorId"], REJECTED_SENSOR);
        let error = letter["error"].as_str().unwrap_or("");
        assert!(error.contains("document_parsing_exception") && error.contains("sensorId"), "{error}");
    }
    let lettered: BTreeSet<String> = letters
        .iter()
        .map(|letter| {
            format!("{}|{}", letter["eventType"].as_str().unwrap_or(""), letter["eventTime"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(lettered, rejected, "every refused window is a dead letter");
    assert_eq!(letters.len(), rejected.len(), "one dead letter per refused window");

    // The template was applied with the documented mapping, and no request broke the API.
    let template = double.template("tidemark-predictions").expect("index template applied");
    assert_eq!(template["index_patterns"], serde_json::json!(["tidemark-predictions-*"]));
    assert_eq!(template["template"]["mappings"]["properties"]["sensorId"]["type"], "keyword");
    assert_eq!(template["template"]["mappings"]["properties"]["windowStart"]["type"], "date");
    assert_eq!(double.violations(), Vec::<String>::new());
    let stats = double.stats();
    eprintln!("stand-in: {stats}");
    let metrics = client.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap_or_default();
    let counted = metrics.lines().find(|line| {
        line.starts_with("tidemark_sink_rows_total")
            && line.contains("\"elasticsearch\"")
            && line.contains("\"rejected\"")
    });
    let counted: u64 = counted.and_then(|line| line.rsplit(' ').next()?.parse().ok()).unwrap_or(0);
    assert_eq!(counted, letters.len() as u64, "rejections counted in tidemark_sink_rows_total:\n{metrics}");
    runtime.shutdown().await;
}

fn process_env(dir: &std::path::Path, double: &EsDouble) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.join("tidemark.db").display())),
        ("TIDEMARK__INGEST__LOG_DIR", dir.join("ingest-log").display().to_string()),
        ("TIDEMARK__PIPELINE__WINDOW", "2s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "1s".into()),
        ("TIDEMARK__PIPELINE__IDLE_TIMEOUT", "1h".into()),
        ("TIDEMARK__ELASTICSEARCH__ENABLED", "true".into()),
        ("TIDEMARK__ELASTICSEARCH__URLS", format!("[\"{}\"]", double.url())),
    ]
}

/// Windows in the store and in the cluster, once they agree.
async fn settled(client: &Client, double: &EsDouble, at_least: usize) -> Vec<String> {
    eventually(Duration::from_secs(60), "the cluster to hold the store's windows", || async {
        let rows = common::all_predictions(client).await;
        double.refresh();
        let docs: Vec<Value> =
            double.documents("tidemark-predictions").into_iter().map(|(_, _, source)| source).collect();
        let rows = common::comparable(&rows);
        (rows.len() >= at_least && rows == common::comparable(&docs)).then_some(rows)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_leaves_the_cluster_equal_to_an_uninterrupted_run() {
    let lines = workload(SimConfig {
        sensors: 40,
        rate: 2000.0,
        duration: Some(Duration::from_secs(30)),
        seed: 9,
        anomalies: 3,
        anomalies_after: Duration::from_secs(10),
        anomaly_duration: Duration::from_secs(4),
        ..SimConfig::default()
    });
    let half = lines.len() / 2;

    let straight_double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in");
    let straight_dir = tempfile::tempdir().expect("temp dir");
    let straight = common::Process::start(&process_env(straight_dir.path(), &straight_double));
    let client = straight.client();
    post_batches(&client, &lines, 1000, Duration::from_millis(100)).await;
    let expected = settled(&client, &straight_double, 500).await;
    drop(straight);

    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut before = common::Process::start(&process_env(dir.path(), &double));
    let client = before.client();
    post_batches(&client, &lines[..half], 1000, Duration::from_millis(100)).await;
    // Killed once the cluster has some of the results, while more and their checkpoints
    // are on their way.
    eventually(Duration::from_secs(30), "the first bulk requests", || async {
        (double.stats()["bulkItems"].as_u64().unwrap_or(0) >= 20).then_some(())
    })
    .await;
    before.signal("KILL");
    let _ = before.wait(Duration::from_secs(10));
    let indexed_before = double.stats()["bulkItems"].as_u64().unwrap_or(0);

    let after = common::Process::start(&process_env(dir.path(), &double));
    let client = after.client();
    post_batches(&client, &lines[half..], 1000, Duration::from_millis(100)).await;
    let got = settled(&client, &double, expected.len()).await;
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected, "after SIGKILL and restart, the cluster and the store equal an uninterrupted run");
    eprintln!("{} windows; {indexed_before} bulk items before the kill", got.len());
    assert_eq!(double.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_names_an_unreachable_cluster_even_with_nothing_to_send() {
    let dir = tempfile::tempdir().expect("temp dir");
    let double = EsDouble::start("127.0.0.1:0".parse().expect("addr")).await.expect("stand-in starts");
    let runtime =
        start(sources(dir.path()).with("elasticsearch.enabled", true).with("elasticsearch.urls", vec![double.url()]))
            .await;
    let client = Client::new(&runtime);
    assert_eq!(client.get("/ready").await.0, 200);
    double.set_down();
    let problems = eventually(Duration::from_secs(20), "/ready to name elasticsearch", || async {
        let (status, body) = client.get("/ready").await;
        (status == 503 && body.to_string().contains("elasticsearch")).then_some(body)
    })
    .await;
    eprintln!("{problems}");
    double.set_up();
    eventually(Duration::from_secs(20), "/ready again", || async {
        (client.get("/ready").await.0 == 200).then_some(())
    })
    .await;
    runtime.shutdown().await;
}
