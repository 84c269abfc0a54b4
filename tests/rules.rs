//! Alert rules end to end: events in over HTTP, alerts out of `GET /api/alerts` with
//! exactly the rule, state and times the rules define; reload without a restart.

mod common;

use std::time::Duration;

use common::{Client, eventually, sources, start};
use serde_json::{Value, json};
use tidemark::config::ConfigSources;

/// Every kind but `anomaly` (its windows depend on the model: the chaos test covers it).
const RULES: &str = r#"
[rules.anomaly]
enabled = false

[rules.hot]
kind = "threshold"
event_types = ["temperature"]
stat = "avg"
above = 30.0
severity = "high"
message = "{sensorId} too hot: {stat} {value} {threshold}"

[rules.hot_streak]
kind = "consecutive"
event_types = ["temperature"]
stat = "max"
above = 30.0
count = 3
severity = "critical"

[rules.pressure_jump]
kind = "rate_of_change"
event_types = ["pressure"]
stat = "avg"
change = 50.0

[rules.silent]
kind = "absence"
sensors = ["s1*"]
after = "5s"
severity = "high"

[rules.spike_then_drop]
kind = "pattern"
within = "2m"
severity = "critical"
steps = [
  { event_type = "temperature", stat = "max", above = 30.0 },
  { event_type = "pressure", stat = "avg", below = 950.0 },
]
"#;

fn rules_table(text: &str) -> toml::Value {
    let parsed: toml::Value = toml::from_str(text).expect("rules parse");
    parsed.get("rules").cloned().expect("a [rules] table")
}

fn pipeline(dir: &std::path::Path) -> ConfigSources {
    sources(dir)
        .with("pipeline.window", "1s")
        .with("pipeline.max_out_of_orderness", "0s")
        .with("pipeline.partitions", 1)
        .with("pipeline.idle_timeout", "1h")
        .with("rules", rules_table(RULES))
}

/// Ten events per second of `(sensor, type)` over `[from_s, to_s)` of event time, the
/// value of second `s` given by `value(s)`.
fn events(
    base: i64,
    sensor: &str,
    event_type: &str,
    seconds: std::ops::Range<i64>,
    value: impl Fn(i64) -> f64,
) -> Vec<Value> {
    seconds
        .flat_map(|s| {
            (0..10).map(move |i| (s, i)).collect::<Vec<_>>()
        })
        .map(|(s, i)| {
            json!({"sensorId": sensor, "eventType": event_type, "value": value(s), "timestamp": base + s * 1000 + i * 100})
        })
        .collect()
}

/// Posts events ordered by time (the sensors interleaved, as devices send them).
async fn post(client: &Client, mut events: Vec<Value>) {
    events.sort_by_key(|e| e["timestamp"].as_i64().unwrap_or(0));
    for chunk in events.chunks(500) {
        let (status, body) = client.post_json(&Value::Array(chunk.to_vec())).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// `(rule, sensorId, eventType, state, startedAt - base, resolvedAt - base)` of every
/// alert, sorted.
async fn alerts(client: &Client, base: i64) -> Vec<(String, String, String, String, i64, Option<i64>)> {
    let page = client.get_ok("/api/alerts?limit=1000").await;
    let millis = |v: &Value| {
        v.as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp_millis() - base)
    };
    let mut rows: Vec<_> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["rule"].as_str().unwrap_or("").to_string(),
                a["sensorId"].as_str().unwrap_or("").to_string(),
                a["eventType"].as_str().unwrap_or("").to_string(),
                a["state"].as_str().unwrap_or("").to_string(),
                millis(&a["startedAt"]).unwrap_or(i64::MIN),
                millis(&a["resolvedAt"]),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn row(
    rule: &str,
    sensor: &str,
    event_type: &str,
    state: &str,
    started: i64,
    resolved: Option<i64>,
) -> (String, String, String, String, i64, Option<i64>) {
    (rule.into(), sensor.into(), event_type.into(), state.into(), started, resolved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_kind_fires_and_resolves_with_exact_times() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(pipeline(dir.path())).await;
    let client = Client::new(&runtime);
    let rules = client.get_ok("/api/rules").await;
    let names: Vec<&str> = rules["items"].as_array().into_iter().flatten().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["hot", "hot_streak", "pressure_jump", "silent", "spike_then_drop"], "{rules}");

    // s1: hot for seconds 10–13, pressure down for 15–16, silent from 30 s; s2 keeps
    // the partition's event time moving to 45 s.
    let base = 1_767_225_600_000i64;
    let mut phase1 = events(base, "s1", "temperature", 0..30, |s| if (10..14).contains(&s) { 35.0 } else { 20.0 });
    phase1.extend(events(base, "s1", "pressure", 0..30, |s| if (15..17).contains(&s) { 900.0 } else { 1000.0 }));
    phase1.extend(events(base, "s2", "temperature", 0..46, |_| 20.0));
    post(&client, phase1).await;

    let window_rules = vec![
        row("hot", "s1", "temperature", "resolved", 10_000, Some(14_000)),
        row("hot_streak", "s1", "temperature", "resolved", 12_000, Some(14_000)),
        row("pressure_jump", "s1", "pressure", "resolved", 15_000, Some(16_000)),
        row("pressure_jump", "s1", "pressure", "resolved", 17_000, Some(18_000)),
        row("spike_then_drop", "s1", "pressure", "resolved", 10_000, Some(17_000)),
    ];
    // Silent by event time (s2 went on): from its last event + 5 s.
    let mut expected = window_rules.clone();
    expected.push(row("silent", "s1", "pressure", "firing", 34_900, None));
    expected.push(row("silent", "s1", "temperature", "firing", 34_900, None));
    expected.sort();
    eventually(Duration::from_secs(10), "the window and event-time absence alerts", || async {
        let found = alerts(&client, base).await;
        (found == expected).then_some(())
    })
    .await;

    // s1 is back at 50 s: its absence alerts resolve at that event's time.
    let mut phase2 = events(base, "s1", "temperature", 50..52, |_| 20.0);
    phase2.extend(events(base, "s1", "pressure", 50..52, |_| 1000.0));
    post(&client, phase2).await;
    let mut expected = window_rules.clone();
    expected.push(row("silent", "s1", "pressure", "resolved", 34_900, Some(50_000)));
    expected.push(row("silent", "s1", "temperature", "resolved", 34_900, Some(50_000)));
    expected.sort();
    eventually(Duration::from_secs(10), "the absence alerts resolved", || async {
        let found = alerts(&client, base).await;
        (found == expected).then_some(())
    })
    .await;

    // Then every sensor goes quiet: by ingest time, s1 is silent again (from its last
    // event, 51.9 s, + 5 s). s2 is not under the rule.
    expected.push(row("silent", "s1", "pressure", "firing", 56_900, None));
    expected.push(row("silent", "s1", "temperature", "firing", 56_900, None));
    expected.sort();
    eventually(Duration::from_secs(20), "the ingest-time absence alerts", || async {
        let found = alerts(&client, base).await;
        (found == expected).then_some(())
    })
    .await;

    // Filters, severities and messages.
    let firing = client.get_ok("/api/alerts?state=firing").await;
    assert_eq!(firing["count"], 2, "{firing}");
    let hot = client.get_ok("/api/alerts?rule=hot").await;
    assert_eq!(hot["items"][0]["severity"], "HIGH");
    assert_eq!(hot["items"][0]["message"], "s1 too hot: avg 35 above 30", "{hot}");
    assert_eq!(hot["items"][0]["kind"], "threshold");
    let pattern = client.get_ok("/api/alerts?rule=spike_then_drop").await;
    assert_eq!(pattern["items"][0]["severity"], "CRITICAL");
    let metrics = runtime.metrics().render();
    assert!(metrics.contains("tidemark_alerts_total{rule=\"hot\",state=\"firing\"} 1"), "{metrics}");
    assert!(metrics.contains("tidemark_alerts_total{rule=\"hot\",state=\"resolved\"} 1"), "{metrics}");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_rules_apply_to_the_next_windows_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(pipeline(dir.path())).await;
    let client = Client::new(&runtime);
    let base = 1_767_225_600_000i64;
    post(&client, events(base, "s3", "temperature", 0..10, |s| if s >= 5 { 25.0 } else { 20.0 })).await;
    runtime.flush_all(Duration::from_secs(10)).await.expect("flushed");
    assert_eq!(client.get_ok("/api/alerts").await["count"], 0, "25 is below every threshold");

    // What a SIGHUP does (the binary's test sends one): load the file again, swap the rules.
    let lower = RULES.replace("above = 30.0\nseverity = \"high\"", "above = 22.0\nseverity = \"high\"");
    let config = common::config(pipeline(dir.path()).with("rules", rules_table(&lower)));
    runtime.rules().replace(tidemark::rules::Rules::from_config(&config.rules));
    post(&client, events(base, "s3", "temperature", 10..14, |_| 25.0)).await;
    runtime.flush_all(Duration::from_secs(10)).await.expect("flushed");
    let found = alerts(&client, base).await;
    assert_eq!(found, vec![row("hot", "s3", "temperature", "firing", 10_000, None)], "only windows after the reload");

    // Back to the first rules: the changed rule's firing alert resolves at the next window.
    let config = common::config(pipeline(dir.path()));
    runtime.rules().replace(tidemark::rules::Rules::from_config(&config.rules));
    post(&client, events(base, "s3", "temperature", 14..16, |_| 25.0)).await;
    runtime.flush_all(Duration::from_secs(10)).await.expect("flushed");
    let found = alerts(&client, base).await;
    assert_eq!(found, vec![row("hot", "s3", "temperature", "resolved", 10_000, Some(14_000))]);
    runtime.shutdown().await;
}

/// Partitions that panic in the middle of `consecutive` runs and `pattern` matches
/// (their progress checkpointed, then replayed) raise exactly the alerts of a calm run.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_state_survives_partition_panics_mid_run_and_mid_match() {
    let base = 1_767_225_600_000i64;
    // 24 sensors, 60 s: each hot for 6 s and low on pressure for 2 s some seconds later
    // (a consecutive run and a pattern match per sensor, at staggered times).
    let mut workload = Vec::new();
    for sensor in 0..24i64 {
        let name = format!("s{sensor:02}");
        let hot = 10 + sensor % 7;
        let low = hot + 8 + sensor % 5;
        workload.extend(events(base, &name, "temperature", 0..60, |s| {
            if (hot..hot + 6).contains(&s) { 35.0 + (s % 3) as f64 } else { 20.0 + (s % 2) as f64 * 0.3 }
        }));
        workload.extend(events(base, &name, "pressure", 0..60, |s| {
            if (low..low + 2).contains(&s) { 900.0 } else { 1000.0 }
        }));
    }
    let scenario = |dir: &std::path::Path| {
        pipeline(dir)
            .with("pipeline.partitions", 2)
            .with("rules.silent.enabled", false)
            .with("scoring.warmup_windows", 5)
            .with("supervision.max_restarts", 1000)
            .with("checkpoint.max_events", 200)
    };
    let run = |config: ConfigSources| {
        let workload = workload.clone();
        async move {
            let runtime = start(config).await;
            let client = Client::new(&runtime);
            post(&client, workload).await;
            eventually(Duration::from_secs(30), "all partitions live and caught up", || async {
                let status = client.get_ok("/api/status").await;
                let partitions = status["partitions"].as_array().cloned().unwrap_or_default();
                partitions.iter().all(|p| p["live"] == true && p["inFlightEvents"] == 0).then_some(())
            })
            .await;
            runtime.flush_all(Duration::from_secs(30)).await.expect("flushed");
            let page = client.get_ok("/api/alerts?limit=1000").await;
            let mut found: Vec<String> = page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    let mut a = a.clone();
                    for volatile in ["id", "createdAt", "updatedAt"] {
                        a.as_object_mut().map(|o| o.remove(volatile));
                    }
                    a.to_string()
                })
                .collect();
            found.sort();
            let status = client.get_ok("/api/status").await;
            let restarts: u64 = status["partitions"]
                .as_array()
                .map(|ps| ps.iter().map(|p| p["restarts"].as_u64().unwrap_or(0)).sum())
                .unwrap_or(0);
            runtime.shutdown().await;
            (found, restarts)
        }
    };
    let calm_dir = tempfile::tempdir().expect("temp dir");
    let (calm, _) = run(scenario(calm_dir.path())).await;
    for rule in ["hot_streak", "spike_then_drop", "hot", "pressure_jump"] {
        let count = calm.iter().filter(|a| a.contains(&format!("\"rule\":\"{rule}\""))).count();
        assert!(count >= 24, "{rule}: {count} alerts in the calm run, one or more per sensor expected");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (faulty, restarts) =
        run(scenario(dir.path()).with("chaos.partition_panic_probability", 0.002).with("chaos.seed", 11)).await;
    eprintln!("{restarts} partition restarts, {} alerts", faulty.len());
    assert!(restarts >= 20, "only {restarts} restarts");
    assert_eq!(faulty, calm, "the same alerts, with the same times, values and messages");
}
