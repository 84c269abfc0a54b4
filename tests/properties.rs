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
                row["revision"],
                row["windowKind"]
            ])
        })
        .collect();
    rows.sort_by_key(|row| row.to_string());
    rows
}

/// Which windows the event types use.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Windows {
    Tumbling,
    /// humidity: hopping 4 s every 1 s; temperature: sessions closed by a 1.5 s gap.
    HoppingAndSession,
}

async fn run(workload: &Workload, split: bool, windows: Windows) -> (Vec<Value>, Vec<Value>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = sources(dir.path())
        .with("pipeline.window", "2s")
        .with("pipeline.max_out_of_orderness", "1s")
        .with("pipeline.allowed_lateness", "1s")
        .with("pipeline.partitions", 3)
        .with("pipeline.idle_timeout", "1h")
        .with("scoring.warmup_windows", 2);
    if windows == Windows::HoppingAndSession {
        config = config
            .with("pipeline.event_types.humidity.window", "hopping")
            .with("pipeline.event_types.humidity.size", "4s")
            .with("pipeline.event_types.humidity.slide", "1s")
            .with("pipeline.event_types.temperature.window", "session")
            .with("pipeline.event_types.temperature.gap", "1500ms");
    }
    let runtime = start(config).await;
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
    let late = client.get_ok("/api/dead-letters?reason=late&limit=1000").await;
    let late = late["items"].as_array().cloned().unwrap_or_default();
    runtime.shutdown().await;
    (rows, late)
}

/// Late events of `event_type` (all: `None`).
fn late_of(late: &[Value], event_type: Option<&str>) -> u64 {
    late.iter().filter(|letter| event_type.is_none_or(|t| letter["eventType"] == t)).count() as u64
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
        let (whole, whole_late) = runtime.block_on(run(&workload, false, Windows::Tumbling));
        let (split, split_late) = runtime.block_on(run(&workload, true, Windows::Tumbling));
        prop_assert_eq!(comparable(&whole), comparable(&split));
        prop_assert_eq!(late_of(&whole_late, None), late_of(&split_late, None));
        // Every accepted event is in exactly one window or late.
        prop_assert_eq!(counted(&whole) + late_of(&whole_late, None), workload.events.len() as u64);
    }

    /// The same with hopping windows (humidity) and session windows (temperature): the
    /// results do not depend on the requests; every temperature event is in exactly one
    /// session or late; every humidity event in up to 4 windows (the window module's
    /// property tests check which), and in at least one unless late.
    #[test]
    fn hopping_and_session_results_do_not_depend_on_request_splitting(workload in workload()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        let (whole, whole_late) = runtime.block_on(run(&workload, false, Windows::HoppingAndSession));
        let (split, split_late) = runtime.block_on(run(&workload, true, Windows::HoppingAndSession));
        prop_assert_eq!(comparable(&whole), comparable(&split));
        prop_assert_eq!(late_of(&whole_late, None), late_of(&split_late, None));
        let of = |event_type: &str| -> Vec<Value> {
            whole.iter().filter(|row| row["eventType"] == event_type).cloned().collect()
        };
        let events_of = |event_type: &str| workload.events.iter().filter(|e| e["eventType"] == event_type).count() as u64;
        let (sessions, hopping) = (of("temperature"), of("humidity"));
        prop_assert_eq!(sessions.is_empty(), events_of("temperature") == 0);
        prop_assert_eq!(hopping.is_empty(), events_of("humidity") == 0);
        prop_assert!(sessions.iter().all(|row| row["windowKind"] == "session"));
        prop_assert!(hopping.iter().all(|row| row["windowKind"] == "hopping"));
        prop_assert_eq!(counted(&sessions) + late_of(&whole_late, Some("temperature")), events_of("temperature"));
        let humidity = events_of("humidity") - late_of(&whole_late, Some("humidity"));
        prop_assert!(counted(&hopping) >= humidity && counted(&hopping) <= 4 * humidity,
            "{} hopping counts for {} accepted events", counted(&hopping), humidity);
    }
}
