//! `tidemark replay` against a straightforward reference computation: the window results
//! of a replayed file equal a plain group-by of its events, value for value.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde_json::Value;
use tidemark::config::{Config, ConfigSources};
use tidemark::replay::{ReplayOptions, SinkKind};
use tidemark::sim::{Generator, SimConfig};

/// (sensorId, eventType, windowStart) → (count, sum in file order, min, max).
type Reference = BTreeMap<(String, String, i64), (u64, f64, f64, f64)>;

fn reference(lines: &[String], window_ms: i64) -> Reference {
    let mut windows = Reference::new();
    for line in lines {
        let event: Value = serde_json::from_str(line).expect("generated line parses");
        let timestamp = event["timestamp"].as_i64().expect("timestamp");
        let value = event["value"].as_f64().expect("value");
        let key = (
            event["sensorId"].as_str().expect("sensorId").to_string(),
            event["eventType"].as_str().expect("eventType").to_string(),
            timestamp - timestamp.rem_euclid(window_ms),
        );
        let entry = windows.entry(key).or_insert((0, 0.0, f64::INFINITY, f64::NEG_INFINITY));
        entry.0 += 1;
        entry.1 += value;
        entry.2 = entry.2.min(value);
        entry.3 = entry.3.max(value);
    }
    windows
}

fn workload() -> Vec<String> {
    // Out-of-order by up to 4 s, inside the 5 s bound: no event is late, so the
    // reference is a plain group-by.
    let config = SimConfig {
        sensors: 200,
        rate: 2000.0,
        duration: Some(Duration::from_secs(60)),
        seed: 3,
        disorder: 0.2,
        max_disorder: Duration::from_secs(4),
        anomalies: 8,
        anomalies_after: Duration::from_secs(20),
        anomaly_duration: Duration::from_secs(10),
        ..SimConfig::default()
    };
    Generator::new(config)
        .map(|event| {
            let mut line = String::new();
            event.write_json(&mut line);
            line.trim_end().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_output_equals_the_reference_computation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lines = workload();
    let input = dir.path().join("events.ndjson");
    let mut file = std::fs::File::create(&input).expect("create");
    for line in &lines {
        writeln!(file, "{line}").expect("write");
    }
    writeln!(file, "{{\"sensorId\": \"broken\"").expect("write");
    drop(file);
    let output = dir.path().join("windows.ndjson");
    let rejected = dir.path().join("rejected.ndjson");
    let config = Config::load(&ConfigSources::default().with("log.level", "warn")).expect("config");
    let window_ms = config.pipeline.window.as_millis() as i64;
    let report = tidemark::replay::run(
        config,
        ReplayOptions {
            input,
            output: Some(output.clone()),
            dead_letters: Some(rejected.clone()),
            sink: SinkKind::None,
            parsers: 2,
        },
    )
    .await
    .expect("replay");
    assert_eq!(report.events, lines.len() as u64);
    assert_eq!((report.rejected, report.late), (1, 0));

    let expected = reference(&lines, window_ms);
    let mut actual = Reference::new();
    for line in std::fs::read_to_string(&output).expect("output").lines() {
        let row: Value = serde_json::from_str(line).expect("output line is JSON");
        for field in ["predictionScore", "anomaly", "windowEnd", "severity"] {
            assert!(!row[field].is_null(), "{field} missing in {row}");
        }
        let key = (
            row["sensorId"].as_str().expect("sensorId").to_string(),
            row["eventType"].as_str().expect("eventType").to_string(),
            row["windowStart"].as_i64().expect("windowStart"),
        );
        let count = row["eventCount"].as_u64().expect("eventCount");
        let average = row["avgValue"].as_f64().expect("avgValue");
        let previous = actual.insert(
            key.clone(),
            (
                count,
                average * count as f64,
                row["minValue"].as_f64().expect("min"),
                row["maxValue"].as_f64().expect("max"),
            ),
        );
        assert!(previous.is_none(), "window {key:?} emitted twice");
        let (ref_count, ref_sum, _, _) = expected.get(&key).unwrap_or_else(|| panic!("unexpected window {key:?}"));
        assert_eq!(count, *ref_count, "{key:?}");
        assert_eq!(average, ref_sum / *ref_count as f64, "avgValue of {key:?} is exactly sum / count");
    }
    assert_eq!(actual.len(), expected.len(), "same windows");
    for (key, (count, _, min, max)) in &actual {
        let (ref_count, _, ref_min, ref_max) = expected[key];
        assert_eq!((*count, *min, *max), (ref_count, ref_min, ref_max), "{key:?}");
    }
    let rejected = std::fs::read_to_string(&rejected).expect("dead letters");
    assert!(rejected.contains(&format!("line {}:", lines.len() + 1)), "{rejected}");
}

#[test]
fn the_cli_prints_a_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, workload()[..5000].join("\n")).expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["replay", "--input"])
        .arg(&input)
        .env("TIDEMARK__LOG__LEVEL", "warn")
        .output()
        .expect("tidemark replay runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report on stdout");
    assert_eq!(report["events"], 5000);
    assert!(report["eventsPerSecond"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(String::from_utf8_lossy(&output.stderr).contains("events/s"));
}
