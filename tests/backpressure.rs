//! A store that refuses writes: checkpoints stop completing, the replay buffers fill,
//! ingestion answers 503 with Retry-After, memory stays bounded, `/ready` says why; when
//! the store recovers, every accepted event is in the results.

mod common;

use std::str::FromStr;
use std::time::Duration;

use common::{Client, all_predictions, eventually, resident_bytes, sources, start};
use serde_json::{Value, json};
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

const T0: i64 = 1_767_225_600_000;

fn batch(start: i64, n: i64) -> Value {
    Value::Array(
        (start..start + n)
            .map(|k| {
                json!({"sensorId": format!("s-{}", k % 50), "eventType": "load", "value": (k % 7) as f64,
                "timestamp": T0 + (k / 50) * 100})
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_backpressures_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("pipeline.window", "1s")
            .with("pipeline.max_out_of_orderness", "0s")
            .with("pipeline.partitions", 2)
            .with("pipeline.idle_timeout", "1h")
            .with("pipeline.max_buffered_events", 4000)
            .with("store.statement_timeout", "300ms"),
    )
    .await;
    let client = Client::new(&runtime);
    let mut accepted = 0u64;
    let mut next = 0i64;
    let (status, body) = client.post_json(&batch(next, 200)).await;
    assert_eq!(status, 202, "{body}");
    accepted += 200;
    next += 200;

    // Another connection takes SQLite's write lock: every write of the sink now fails
    // with SQLITE_BUSY (a real store fault), and it retries with backoff.
    let url = format!("sqlite://{}", dir.path().join("tidemark.db").display());
    let mut blocker: SqliteConnection =
        SqliteConnectOptions::from_str(&url).expect("url").connect().await.expect("second connection");
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut blocker).await.expect("lock");

    // Keep posting until the bound is reached.
    let mut refused = None;
    for _ in 0..400 {
        let response = reqwest::Client::new()
            .post(format!("{}/api/events", client.base))
            .json(&batch(next, 100))
            .send()
            .await
            .expect("request");
        if response.status() == 503 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 202);
        accepted += 100;
        next += 100;
    }
    let refused = refused.expect("ingestion refuses once the replay buffers are full");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let answer: Value = refused.json().await.expect("json");
    assert_eq!(answer["error"]["code"], "backpressure");
    assert!(accepted <= 4000 + 200, "accepted {accepted} beyond the bound");

    // Not ready, and the status shows why.
    let ready = eventually(Duration::from_secs(10), "not ready while the sink fails", || async {
        let (status, ready) = client.get("/ready").await;
        (status == 503).then_some(ready)
    })
    .await;
    assert!(ready["problems"].to_string().contains("store sink"), "{ready}");
    let status = client.get_ok("/api/status").await;
    assert!(status["sinks"][0]["consecutiveFailures"].as_u64().unwrap_or(0) > 0, "{status}");
    for partition in status["partitions"].as_array().expect("partitions") {
        assert!(partition["replayBufferEvents"].as_u64() <= partition["replayBufferLimit"].as_u64(), "{partition}");
    }

    // Memory stays flat while clients keep pushing for two seconds.
    let before = resident_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut refusals = 0;
    while tokio::time::Instant::now() < deadline {
        let (status, _) = client.post_json(&batch(next, 100)).await;
        assert_eq!(status, 503);
        refusals += 1;
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(refusals > 10);
    assert!(grown < 16 << 20, "resident memory grew by {grown} bytes under refused load");

    // The store recovers: the backlog is written, ingestion resumes.
    sqlx::query("ROLLBACK").execute(&mut blocker).await.expect("unlock");
    drop(blocker);
    eventually(Duration::from_secs(20), "ingestion accepted again", || async {
        let (status, _) = client.post_json(&batch(next, 100)).await;
        (status == 202).then_some(())
    })
    .await;
    accepted += 100;
    eventually(Duration::from_secs(20), "ready again", || async {
        let (status, _) = client.get("/ready").await;
        (status == 200).then_some(())
    })
    .await;
    runtime.flush_all(Duration::from_secs(20)).await.expect("flush");
    let rows = all_predictions(&client).await;
    let counted: u64 = rows.iter().map(|row| row["eventCount"].as_u64().unwrap_or(0)).sum();
    assert_eq!(counted, accepted, "every accepted event is in the results once");
    runtime.shutdown().await;
}
