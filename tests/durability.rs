//! A `202` from embedded ingestion is durable: the real binary is SIGKILLed at random
//! moments while clients post, 20 times over the same store and ingest log, and every
//! event that got a `202` is counted exactly once in the results. (A request the kill
//! cut off may or may not have been taken, but never partly within one sensor, and
//! never twice.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Process, eventually};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;
const SENSORS_PER_REQUEST: u64 = 2;
const EVENTS_PER_SENSOR: u64 = 50;

fn env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.join("tidemark.db").display())),
        // Only so the last windows fire soon after the stream ends; durability is default.
        ("TIDEMARK__PIPELINE__IDLE_TIMEOUT", "2s".into()),
        ("TIDEMARK__LOG__LEVEL", "info".into()),
    ]
}

fn request(id: u64) -> Value {
    Value::Array(
        (0..SENSORS_PER_REQUEST * EVENTS_PER_SENSOR)
            .map(|k| {
                json!({
                    "sensorId": format!("r{id}-s{}", k % SENSORS_PER_REQUEST),
                    "eventType": "temperature",
                    "value": ((id * 31 + k * 7) % 97) as f64 / 4.0,
                    "timestamp": T0 + (k / SENSORS_PER_REQUEST) as i64 * 100,
                })
            })
            .collect(),
    )
}

#[derive(Default)]
struct Outcomes {
    acknowledged: BTreeSet<u64>,
    attempted: BTreeSet<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_twenty_sigkills_exactly_once() {
    let seed: u64 = std::env::var("TIDEMARK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (TIDEMARK_TEST_SEED={seed} repeats this run)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let next_id = Arc::new(AtomicU64::new(0));
    let outcomes = Arc::new(parking_lot::Mutex::new(Outcomes::default()));
    let mut kills = 0;
    while kills < 20 {
        let mut process = Process::start(&env(dir.path()));
        let mut posters = Vec::new();
        for _ in 0..3 {
            let client = process.client();
            let next_id = Arc::clone(&next_id);
            let outcomes = Arc::clone(&outcomes);
            posters.push(tokio::spawn(async move {
                loop {
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    outcomes.lock().attempted.insert(id);
                    match client.try_post_json(&request(id)).await {
                        Some(202) => {
                            outcomes.lock().acknowledged.insert(id);
                        }
                        Some(503) => tokio::time::sleep(Duration::from_millis(50)).await,
                        Some(status) => panic!("request {id}: unexpected status {status}"),
                        None => return, // the process is gone
                    }
                }
            }));
        }
        // Sometimes right after start-up (while it replays its log), mostly mid-stream.
        let delay = if rng.random_bool(0.2) { rng.random_range(0..50) } else { rng.random_range(100..900) };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        process.signal("KILL");
        process.wait(Duration::from_secs(10));
        for poster in posters {
            poster.await.expect("poster");
        }
        kills += 1;
    }

    let process = Process::start(&env(dir.path()));
    let client = process.client();
    let (acknowledged, attempted) = {
        let outcomes = outcomes.lock();
        (outcomes.acknowledged.clone(), outcomes.attempted.clone())
    };
    assert!(acknowledged.len() >= 200, "only {} requests acknowledged across the kills", acknowledged.len());
    let expected_sensors = acknowledged.len() as u64 * SENSORS_PER_REQUEST;
    // Every window fires on the idle timeout once the stream has stopped.
    let counts = eventually(Duration::from_secs(60), "every acknowledged sensor's window", || async {
        let rows = common::all_predictions(&client).await;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for row in &rows {
            if let (Some(sensor), Some(count)) = (row["sensorId"].as_str(), row["eventCount"].as_u64()) {
                *counts.entry(sensor.to_string()).or_default() += count;
            }
        }
        let present = acknowledged
            .iter()
            .flat_map(|id| (0..SENSORS_PER_REQUEST).map(move |s| format!("r{id}-s{s}")))
            .filter(|sensor| counts.contains_key(sensor))
            .count() as u64;
        (present == expected_sensors).then_some(counts)
    })
    .await;
    let mut lost_or_doubled = Vec::new();
    for id in &attempted {
        for s in 0..SENSORS_PER_REQUEST {
            let sensor = format!("r{id}-s{s}");
            let count = counts.get(&sensor).copied().unwrap_or(0);
            let acked = acknowledged.contains(id);
            let fine = count == EVENTS_PER_SENSOR || (!acked && count == 0);
            if !fine {
                lost_or_doubled.push(format!("{sensor}: {count} events counted, acknowledged: {acked}"));
            }
        }
    }
    let unknown = counts.keys().filter(|sensor| !sensor.starts_with('r')).count();
    assert_eq!(unknown, 0);
    assert!(
        lost_or_doubled.is_empty(),
        "{} sensors off (of {} requests, {} acknowledged), e.g. {:?}",
        lost_or_doubled.len(),
        attempted.len(),
        acknowledged.len(),
        &lost_or_doubled[..lost_or_doubled.len().min(10)]
    );
    let status = client.get_ok("/api/status").await;
    eprintln!(
        "{kills} SIGKILLs: {} requests attempted, {} acknowledged ({} events), all counted exactly once; status {}",
        attempted.len(),
        acknowledged.len(),
        acknowledged.len() as u64 * SENSORS_PER_REQUEST * EVENTS_PER_SENSOR,
        status["partitions"]
    );
}
