//! Property tests through the whole pipeline (HTTP → router → partitions → store → API):
//! window results do not depend on how events are split across requests or body
//! formats, and every accepted event is counted exactly once or dead-lettered as late.

mod common;

use std::time::Duration;

use common::{Client, all_predictions, sources, start};
use proptest::prelude::*;
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;

#[derive(Clone, Debug)]
struct Workload {
    events: Vec<Value>,
    /// Request boundaries (sorted indexes) and whether each request is NDJSON.
    cuts: Vec<usize>,
    ndjson: Vec<bool>,
}

fn workload() -> impl Strategy<Value = Workload> {
    proptest::collection::vec((0u8..5, 0u8..2, -3_000i64..600, -5_000i32..5_000), 20..160).prop_flat_map(|raw| {
        let events: Vec<Value> = raw
            .iter()
            .enumerate()
            .map(|(k, &(sensor, kind, jitter, value))| {
                json!({
                    "sensorId": format!("s-{sensor}"),
                    "eventType": if kind == 0 { "temperature" } else { "humidity" },
                    "value": f64::from(value) / 100.0,
                    "timestamp": T0 + k as i64 * 250 + jitter,
                })
            })
            .collect();
        let n = events.len();
        (Just(events), proptest::collection::vec(0..n, 0..8), proptest::collection::vec(any::<bool>(), 9)).prop_map(
            |(events, mut cuts, ndjson)| {
                cuts.sort_unstable();
                cuts.dedup();
                Workload { events, cuts, ndjson }
            },
        )
    })
}

/// The fields a window result is compared on (not ids or timestamps of writing).
fn comparable(rows: &[Value]) -> Vec<Value> {
    let mut rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!([
                row["sensorId"],
                row["eventType"],
                row["windowStart"],
                row["windowEnd"],
                row["eventCount"],
                row["avgValue"],
                row["minValue"],
                row["maxValue"],
                row["stddev"],
                row["predictionScore"],
                row["anomaly"],
                row["severity"],
                row["revision"]
            ])
        })
        .collect();
    rows.sort_by_key(|row| row.to_string());
    rows
}

async fn run(workload: &Workload, split: bool) -> (Vec<Value>, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("pipeline.window", "2s")
            .with("pipeline.max_out_of_orderness", "1s")
            .with("pipeline.allowed_lateness", "1s")
            .with("pipeline.partitions", 3)
            .with("pipeline.idle_timeout", "1h")
            .with("scoring.warmup_windows", 2),
    )
    .await;
    let client = Client::new(&runtime);
    let mut bounds = vec![0];
    if split {
        bounds.extend(workload.cuts.iter().copied());
    }
    bounds.push(workload.events.len());
    for (i, range) in bounds.windows(2).enumerate() {
        let chunk = &workload.events[range[0]..range[1]];
        if chunk.is_empty() {
            continue;
        }
        let (status, body) = if split && workload.ndjson[i % workload.ndjson.len()] {
            let lines: Vec<String> = chunk.iter().map(Value::to_string).collect();
            client.post("/api/events", "application/x-ndjson", lines.join("\n")).await
        } else {
            client.post_json(&Value::Array(chunk.to_vec())).await
        };
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"].as_u64(), Some(chunk.len() as u64), "{body}");
    }
    runtime.flush_all(Duration::from_secs(10)).await.expect("flush");
    let rows = all_predictions(&client).await;
    let late = client.get_ok("/api/dead-letters?reason=late&limit=1000").await["count"].as_u64().unwrap_or(0);
    runtime.shutdown().await;
    (rows, late)
}

/// Sum of eventCount over the latest revision of every window.
fn counted(rows: &[Value]) -> u64 {
    rows.iter().map(|row| row["eventCount"].as_u64().unwrap_or(0)).sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn results_do_not_depend_on_request_splitting(workload in workload()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        let (whole, whole_late) = runtime.block_on(run(&workload, false));
        let (split, split_late) = runtime.block_on(run(&workload, true));
        prop_assert_eq!(comparable(&whole), comparable(&split));
        prop_assert_eq!(whole_late, split_late);
        // Every accepted event is in exactly one window or late.
        prop_assert_eq!(counted(&whole) + whole_late, workload.events.len() as u64);
    }
}
