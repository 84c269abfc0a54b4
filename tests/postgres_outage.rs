//! PostgreSQL stopped for 20 s in the middle of a stream: the sink retries, `/ready`
//! reports it, ingestion backpressures, the process keeps running, and when the server
//! is back the `predictions` table equals a run without the outage, row for row.

mod common;

use std::time::Duration;

use common::{
    Client, PrivatePostgres, all_predictions, comparable, fresh_postgres_database, post_batches, sources, start,
    workload,
};
use tidemark::config::ConfigSources;
use tidemark::sim::SimConfig;

fn lines() -> Vec<String> {
    workload(SimConfig {
        sensors: 100,
        rate: 1000.0,
        duration: Some(Duration::from_secs(30)),
        seed: 5,
        disorder: 0.05,
        max_disorder: Duration::from_millis(1500),
        anomalies: 4,
        anomalies_after: Duration::from_secs(10),
        anomaly_duration: Duration::from_secs(5),
        ..SimConfig::default()
    })
}

fn settings(dir: &std::path::Path, url: String) -> ConfigSources {
    sources(dir)
        .with("store.url", url)
        .with("store.statement_timeout", "2s")
        .with("pipeline.window", "2s")
        .with("pipeline.max_out_of_orderness", "1s")
        .with("pipeline.partitions", 4)
        .with("pipeline.idle_timeout", "1h")
        .with("pipeline.max_buffered_events", 8000)
        .with("scoring.warmup_windows", 2)
}

async fn finish(runtime: tidemark::runtime::Runtime, client: &Client) -> Vec<String> {
    runtime.flush_all(Duration::from_secs(60)).await.expect("flush");
    let rows = all_predictions(client).await;
    runtime.shutdown().await;
    comparable(&rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_20_seconds_loses_and_duplicates_nothing() {
    let lines = lines();

    let dir = tempfile::tempdir().expect("temp dir");
    let baseline = start(settings(dir.path(), fresh_postgres_database().await)).await;
    let client = Client::new(&baseline);
    post_batches(&client, &lines, 500, Duration::from_millis(200)).await;
    let expected = finish(baseline, &client).await;
    assert!(expected.len() > 1000, "{} windows", expected.len());

    let server = PrivatePostgres::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut runtime = start(settings(dir.path(), server.url())).await;
    let client = Client::new(&runtime);
    let third = lines.len() / 3;
    post_batches(&client, &lines[..third], 500, Duration::from_millis(200)).await;

    server.stop();
    let feeder = {
        let client = Client::new(&runtime);
        let rest = lines[third..].to_vec();
        tokio::spawn(async move { post_batches(&client, &rest, 500, Duration::from_millis(500)).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, ready) = client.get("/ready").await;
    assert_eq!(status, 503, "not ready while PostgreSQL is down: {ready}");
    assert!(ready["problems"].to_string().contains("store"), "{ready}");
    assert_eq!(client.get_ok("/health").await["status"], "ok", "alive throughout");
    let status = client.get_ok("/api/status").await;
    assert!(status["sinks"][0]["consecutiveFailures"].as_u64().unwrap_or(0) > 0, "{status}");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(!feeder.is_finished(), "ingestion backpressures while the store is down");
    server.resume();

    let accepted =
        tokio::time::timeout(Duration::from_secs(120), feeder).await.expect("feeding finishes").expect("feeder");
    assert_eq!(accepted as usize, lines.len() - third);
    common::eventually(Duration::from_secs(30), "ready again", || async {
        let (status, _) = client.get("/ready").await;
        (status == 200).then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), runtime.stopped()).await.is_err(),
        "the supervision tree kept running"
    );
    let actual = finish(runtime, &client).await;
    assert_eq!(expected.len(), actual.len());
    assert_eq!(expected, actual, "the table equals the run without the outage");
}
