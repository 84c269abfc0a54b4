//! Supervision: partitions that die mid-stream are restarted from their checkpoint and
//! replayed, the pipeline keeps serving, and no accepted event is lost or counted twice.

mod common;

use std::time::Duration;

use common::{Client, all_predictions, eventually, sources, start};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;

/// Events of `sensors` sensors, one per sensor every 100 ms of event time, in batches.
fn batches(sensors: usize, batches: usize, per_batch: usize) -> Vec<Vec<Value>> {
    let mut k = 0i64;
    (0..batches)
        .map(|_| {
            (0..per_batch)
                .map(|_| {
                    let sensor = k as usize % sensors;
                    let event = json!({
                        "sensorId": format!("sensor-{sensor}"),
                        "eventType": "temperature",
                        "value": (k % 17) as f64 + 0.25,
                        "timestamp": T0 + (k / sensors as i64) * 100,
                    });
                    k += 1;
                    event
                })
                .collect()
        })
        .collect()
}

fn comparable(rows: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = rows
        .iter()
        .map(|row| {
            json!([
                row["sensorId"],
                row["windowStart"],
                row["eventCount"],
                row["avgValue"],
                row["minValue"],
                row["maxValue"],
                row["predictionScore"],
                row["revision"]
            ])
            .to_string()
        })
        .collect();
    rows.sort();
    rows
}

async fn run(kill_every: Option<usize>) -> (Vec<String>, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("pipeline.window", "1s")
            .with("pipeline.max_out_of_orderness", "0s")
            .with("pipeline.partitions", 4)
            .with("pipeline.idle_timeout", "1h"),
    )
    .await;
    let client = Client::new(&runtime);
    let mut kills = 0;
    for (i, batch) in batches(40, 60, 200).into_iter().enumerate() {
        if let Some(every) = kill_every
            && i % every == every / 2
        {
            let partition = (i / every) as u32 % 4;
            if let Some(actor) = runtime.router().actor(partition) {
                actor.kill();
                kills += 1;
            }
        }
        let (status, body) = client.post_json(&Value::Array(batch)).await;
        assert_eq!(status, 202, "batch {i}: {body}");
        assert_eq!(body["accepted"], 200);
    }
    assert_eq!(client.get_ok("/health").await["status"], "ok");
    let restarts = if kill_every.is_some() {
        assert!(kills > 0);
        // Every killed partition comes back.
        eventually(Duration::from_secs(10), "all partitions live", || async {
            let status = client.get_ok("/api/status").await;
            let partitions = status["partitions"].as_array().cloned().unwrap_or_default();
            partitions
                .iter()
                .all(|p| p["live"] == true)
                .then(|| partitions.iter().map(|p| p["restarts"].as_u64().unwrap_or(0)).sum::<u64>())
        })
        .await
    } else {
        0
    };
    runtime.flush_all(Duration::from_secs(10)).await.expect("flush");
    let rows = all_predictions(&client).await;
    let total: u64 = rows.iter().map(|row| row["eventCount"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total, 60 * 200, "every accepted event counted once");
    runtime.shutdown().await;
    (comparable(&rows), restarts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_partitions_restart_and_replay_without_loss() {
    let (clean, _) = run(None).await;
    let (with_kills, restarts) = run(Some(10)).await;
    assert!(restarts >= 6, "status shows the restarts: {restarts}");
    assert_eq!(clean.len(), with_kills.len());
    assert_eq!(clean, with_kills, "identical results with and without kills");
}
