//! Graceful shutdown and resume with the real binary: SIGTERM in the middle of a window,
//! start again, send the rest of the window; the window's result is the uninterrupted
//! run's, and the process exits within `shutdown.timeout`.

mod common;

use std::time::{Duration, Instant};

use common::{Process, eventually};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;

/// Two halves of the 10 s window [T0, T0+10 s) for 20 sensors, and an event per sensor
/// that moves its watermark past the window's end.
fn halves() -> (Value, Value, Value) {
    let events = |from: i64, to: i64| {
        Value::Array(
            (from..to)
                .map(|k| {
                    json!({"sensorId": format!("s-{}", k % 20), "eventType": "temperature",
                    "value": ((k * 37) % 101) as f64 / 10.0, "timestamp": T0 + (k / 20) * 50})
                })
                .collect(),
        )
    };
    let closing = Value::Array(
        (0..20)
            .map(|s| json!({"sensorId": format!("s-{s}"), "eventType": "temperature", "value": 0.0, "timestamp": T0 + 12_500}))
            .collect(),
    );
    (events(0, 2000), events(2000, 4000), closing)
}

fn env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.join("tidemark.db").display())),
        ("TIDEMARK__PIPELINE__WINDOW", "10s".into()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "2s".into()),
        ("TIDEMARK__PIPELINE__IDLE_TIMEOUT", "1h".into()),
        ("TIDEMARK__SHUTDOWN__TIMEOUT", "5s".into()),
    ]
}

async fn window_rows(client: &common::Client) -> Vec<String> {
    eventually(Duration::from_secs(15), "20 windows", || async {
        let page = client.get_ok(&format!("/api/predictions?to={}&limit=100", T0 + 1)).await;
        let rows = page["items"].as_array().cloned().unwrap_or_default();
        (rows.len() == 20).then(|| {
            let mut rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    json!([
                        r["sensorId"],
                        r["windowStart"],
                        r["eventCount"],
                        r["avgValue"],
                        r["minValue"],
                        r["maxValue"],
                        r["stddev"],
                        r["revision"]
                    ])
                    .to_string()
                })
                .collect();
            rows.sort();
            rows
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_then_resume_gives_the_uninterrupted_result() {
    let (first, second, closing) = halves();

    let straight_dir = tempfile::tempdir().expect("temp dir");
    let mut straight = Process::start(&env(straight_dir.path()));
    let client = straight.client();
    for body in [&first, &second, &closing] {
        let (status, answer) = client.post_json(body).await;
        assert_eq!(status, 202, "{answer}");
    }
    let expected = window_rows(&client).await;
    straight.signal("TERM");
    assert!(straight.wait(Duration::from_secs(10)).success());

    let dir = tempfile::tempdir().expect("temp dir");
    let mut before = Process::start(&env(dir.path()));
    let client = before.client();
    let (status, answer) = client.post_json(&first).await;
    assert_eq!(status, 202, "{answer}");
    let stopping = Instant::now();
    before.signal("TERM");
    let exit = before.wait(Duration::from_secs(10));
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}\n{}", before.log());
    assert!(stopping.elapsed() < Duration::from_secs(5), "within shutdown.timeout");
    assert!(before.log().contains("tidemark stopped"), "{}", before.log());

    let after = Process::start(&env(dir.path()));
    let client = after.client();
    let (status, answer) = client.get("/api/predictions").await;
    assert_eq!((status, answer["count"].as_u64()), (200, Some(0)), "no window fired before the restart");
    for body in [&second, &closing] {
        let (status, answer) = client.post_json(body).await;
        assert_eq!(status, 202, "{answer}");
    }
    assert_eq!(window_rows(&client).await, expected, "the resumed window equals the uninterrupted one");
}
