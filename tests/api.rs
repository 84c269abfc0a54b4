//! End-to-end through the HTTP API: ingestion of every body shape, exact window
//! aggregates, late and invalid events in the dead-letter store, query parameters, and
//! the process still serving after bad input. Every test runs on SQLite and on
//! PostgreSQL: the API answers the same on both.

mod common;

use std::time::Duration;

use common::{Backend, Client, eventually, sources_on, start};
use serde_json::{Value, json};

/// 2026-01-01T00:00:00Z: event times far from the wall clock, windows aligned to it.
const T0: i64 = 1_767_225_600_000;

backend_tests!(
    sqlite,
    Backend::Sqlite,
    [
        scenario_with_out_of_order_late_and_invalid_events,
        whole_body_errors_and_limits,
        queries_filter_paginate_and_aggregate,
        a_stale_owner_cannot_overwrite_a_checkpoint,
        a_broken_clock_or_a_huge_value_is_rejected_and_harms_nothing,
        the_dead_letter_store_is_bounded,
        keys_are_bounded_and_idle_keys_leave,
    ]
);
backend_tests!(
    postgres,
    Backend::Postgres,
    [
        scenario_with_out_of_order_late_and_invalid_events,
        whole_body_errors_and_limits,
        queries_filter_paginate_and_aggregate,
        a_stale_owner_cannot_overwrite_a_checkpoint,
        a_broken_clock_or_a_huge_value_is_rejected_and_harms_nothing,
        the_dead_letter_store_is_bounded,
        keys_are_bounded_and_idle_keys_leave,
    ]
);

fn event(sensor: &str, value: f64, offset_ms: i64) -> Value {
    json!({"sensorId": sensor, "eventType": "temperature", "value": value, "timestamp": T0 + offset_ms})
}

async fn predictions_of(client: &Client, sensor: &str, expected: usize) -> Vec<Value> {
    eventually(Duration::from_secs(15), &format!("{expected} windows of {sensor}"), || async {
        let page = client.get_ok(&format!("/api/predictions?sensorId={sensor}")).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        (items.len() >= expected).then_some(items)
    })
    .await
}

async fn scenario_with_out_of_order_late_and_invalid_events(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources_on(backend, dir.path())
            .await
            .with("pipeline.window", "10s")
            .with("pipeline.max_out_of_orderness", "2s")
            .with("pipeline.partitions", 2)
            .with("pipeline.idle_timeout", "1h"),
    )
    .await;
    let client = Client::new(&runtime);

    // In order, then out of order within the 2 s bound (2000 after 3000), one request.
    let (status, body) = client
        .post_json(&json!([
            event("a", 1.0, 1_000),
            event("a", 5.0, 3_000),
            event("a", 3.0, 2_000),
            event("a", 2.0, 9_000)
        ]))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 4);
    assert_eq!(body["rejected"], 0);

    // NDJSON: the watermark passes 10 s (12.5 s − 2 s) and fires [0, 10 s); then an event
    // for that closed window is late; an unparsable line in between is rejected alone.
    let ndjson = format!("{}\n{{not json\n{}\n", event("a", 10.0, 12_500), event("a", 100.0, 5_000));
    let (status, body) = client.post("/api/events", "application/x-ndjson", ndjson).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["rejected"], 1, "{body}");
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["reason"], "unparsable");

    // A single object, snake_case, RFC 3339 timestamp: fires [10 s, 20 s).
    let (status, body) = client
        .post_json(&json!({"sensor_id": "a", "event_type": "temperature", "value": 20.0, "timestamp": "2026-01-01T00:00:22.500Z"}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);

    // Invalid events, each naming its field and reason.
    let long = "x".repeat(300);
    let (status, body) = client
        .post_json(&json!([
            {"eventType": "temperature", "value": 1.0},
            {"sensorId": "b", "eventType": "temperature", "value": "hot"},
            {"sensorId": "b", "eventType": "temperature", "value": "NaN"},
            {"sensorId": long, "eventType": "temperature", "value": 1.0},
            {"sensorId": "b", "eventType": "temperature", "value": 1.0, "timestamp": "soon"},
            event("b", 7.0, 1_000),
        ]))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"], 5);
    let reasons: Vec<(u64, &str, &str)> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (e["index"].as_u64().unwrap_or(99), e["field"].as_str().unwrap_or(""), e["reason"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (0, "sensorId", "missing_field"),
            (1, "value", "wrong_type"),
            (2, "value", "non_finite"),
            (3, "sensorId", "oversize"),
            (4, "timestamp", "invalid_timestamp"),
        ]
    );
    assert!(body["errors"][1]["error"].as_str().unwrap_or("").starts_with("value:"), "{body}");

    // Exact aggregates of the two fired windows, newest first.
    let windows = predictions_of(&client, "a", 2).await;
    assert_eq!(windows.len(), 2, "{windows:?}");
    let (second, first) = (&windows[0], &windows[1]);
    assert_eq!(first["windowStart"], "2026-01-01T00:00:00.000Z");
    assert_eq!(first["windowEnd"], "2026-01-01T00:00:10.000Z");
    assert_eq!(first["eventCount"], 4);
    assert_eq!(first["avgValue"], 2.75);
    assert_eq!(first["minValue"], 1.0);
    assert_eq!(first["maxValue"], 5.0);
    assert_eq!(first["revision"], 0);
    assert_eq!(first["sensorId"], "a");
    assert_eq!(first["eventType"], "temperature");
    assert_eq!(second["windowStart"], "2026-01-01T00:00:10.000Z");
    assert_eq!(second["eventCount"], 1);
    assert_eq!(second["avgValue"], 10.0);
    assert_eq!((second["minValue"].clone(), second["maxValue"].clone()), (json!(10.0), json!(10.0)));
    for window in &windows {
        let score = window["predictionScore"].as_f64().expect("score");
        assert!((0.0..=1.0).contains(&score));
        assert!(["LOW", "MEDIUM", "HIGH", "CRITICAL"].contains(&window["severity"].as_str().unwrap_or("")));
    }

    // The late event and the six rejected inputs are in the dead-letter store.
    let letters = eventually(Duration::from_secs(10), "dead letters", || async {
        let body = client.get_ok("/api/dead-letters?limit=100").await;
        (body["count"].as_u64() == Some(7)).then_some(body)
    })
    .await;
    let late = client.get_ok("/api/dead-letters?reason=late").await;
    assert_eq!(late["count"], 1, "{late}");
    let late_row = &late["items"][0];
    assert_eq!(late_row["sensorId"], "a");
    assert_eq!(late_row["eventTime"], "2026-01-01T00:00:05.000Z");
    assert!(late_row["error"].as_str().unwrap_or("").contains("watermark"), "{late_row}");
    assert_eq!(letters["totalsByReason"]["late"], 1);
    assert_eq!(letters["totalsByReason"]["unparsable"], 1);
    assert_eq!(letters["totalsByReason"]["missing_field"], 1);
    assert_eq!(letters["totalsByReason"]["wrong_type"], 1);
    assert_eq!(letters["totalsByReason"]["non_finite"], 1);
    assert_eq!(letters["totalsByReason"]["oversize"], 1);
    assert_eq!(letters["totalsByReason"]["invalid_timestamp"], 1);
    let unparsable = client.get_ok("/api/dead-letters?reason=unparsable").await;
    assert_eq!(unparsable["items"][0]["payload"], "{not json");

    // Still serving.
    assert_eq!(client.get_ok("/health").await["status"], "ok");
    assert_eq!(client.get_ok("/ready").await["status"], "ready");
    let metrics = reqwest::get(format!("{}/metrics", client.base)).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("tidemark_events_rejected_total{source=\"http\",reason=\"oversize\"} 1"), "{metrics}");
    assert!(metrics.contains("tidemark_events_late_total"), "{metrics}");
    runtime.shutdown().await;
}

async fn whole_body_errors_and_limits(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(sources_on(backend, dir.path()).await.with("http.max_body_bytes", 4096)).await;
    let client = Client::new(&runtime);

    let (status, body) = client.post("/api/events", "application/json", "{\"sensorId\": ").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_body");

    let (status, body) = client.post("/api/events", "application/json", "42").await;
    assert_eq!(status, 400, "{body}");

    let big = format!("[{}]", vec![event("a", 1.0, 0).to_string(); 100].join(","));
    let (status, body) = client.post("/api/events", "application/json", big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (status, body) =
        client.post("/api/events", "application/json", vec!['\u{0}'; 10].into_iter().collect::<String>()).await;
    assert_eq!(status, 400, "{body}");

    // Only JSON and NDJSON: a browser's cross-origin text/plain or form POST is refused.
    let one = event("a", 1.0, 0).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, body) = client.post("/api/events", content_type, one.clone()).await;
        assert_eq!(status, 415, "{content_type}: {body}");
        assert_eq!(body["error"]["code"], "unsupported_media_type");
        assert!(body["error"]["message"].as_str().unwrap_or("").contains(content_type), "{body}");
    }
    let (status, body) = client.get("/api/events").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");

    // Unknown routes and bad parameters get JSON errors naming what is wrong.
    let (status, body) = client.get("/api/nope").await;
    assert_eq!(status, 404, "{body}");
    for (path, parameter) in [
        ("/api/predictions?limit=0", "limit"),
        ("/api/predictions?limit=5000", "limit"),
        ("/api/predictions?from=yesterday", "from"),
        ("/api/predictions?anomaly=maybe", "anomaly"),
        ("/api/predictions?sensorid=a", "sensorid"),
        ("/api/predictions?cursor=zzz", "cursor"),
        ("/api/alerts?severity=SEVERE", "severity"),
        ("/api/alerts?state=open", "state"),
        ("/api/sensors/top?by=loudness", "by"),
        ("/api/sensors/top?n=1000", "n"),
        ("/api/summary?minutes=-1", "minutes"),
        ("/api/dead-letters?reason=bored", "reason"),
    ] {
        let (status, body) = client.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{path}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.starts_with(&format!("{parameter}:")), "{path}: {message}");
    }
    assert_eq!(client.get_ok("/health").await["status"], "ok");
    runtime.shutdown().await;
}

async fn queries_filter_paginate_and_aggregate(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources_on(backend, dir.path())
            .await
            .with("pipeline.window", "1s")
            .with("pipeline.max_out_of_orderness", "0s")
            .with("scoring.warmup_windows", 3)
            .with("scoring.learning_windows", 3),
    )
    .await;
    let client = Client::new(&runtime);
    // Recent event times, so the minute-based queries see them: 3 sensors × 12 windows,
    // sensor "hot" jumps in its last window.
    let base = chrono::Utc::now().timestamp_millis() / 1000 * 1000 - 60_000;
    let mut events = Vec::new();
    for window in 0..12 {
        for (sensor, level) in [("cold", 5.0), ("warm", 20.0), ("hot", 30.0)] {
            let jump = if sensor == "hot" && window == 11 { 50.0 } else { 0.0 };
            for i in 0..4 {
                let wobble = f64::from(i % 2) * 0.5;
                events.push(json!({"sensorId": sensor, "eventType": "temperature", "value": level + wobble + jump,
                    "timestamp": base + window * 1000 + i64::from(i) * 200}));
            }
        }
    }
    events.push(json!({"sensorId": "humid", "eventType": "humidity", "value": 40.0, "timestamp": base}));
    // A last event per sensor moves every watermark past the 12th window.
    for sensor in ["cold", "warm", "hot"] {
        events.push(json!({"sensorId": sensor, "eventType": "temperature", "value": 0.0, "timestamp": base + 13_000}));
    }
    let (status, body) = client.post_json(&Value::Array(events)).await;
    assert_eq!(status, 202, "{body}");
    runtime.flush_all(Duration::from_secs(10)).await.expect("flush");

    let all = common::all_predictions(&client).await;
    assert_eq!(all.len(), 3 * 13 + 1, "12 windows + the flushed last one per sensor, and humid's");

    // Pagination: pages of 7 cover every row once, newest first.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client.get_ok(&format!("/api/predictions?limit=7{cursor}")).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= 7);
        seen.extend(items.iter().map(|row| row["id"].as_i64().unwrap_or(-1)));
        match page["nextCursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (all.len(), all.len()));

    // Filters.
    let hot = client.get_ok("/api/predictions?sensorId=hot&eventType=temperature&limit=1000").await;
    assert_eq!(hot["count"], 13);
    let from = chrono::DateTime::from_timestamp_millis(base + 5_000).map(|t| t.to_rfc3339()).unwrap_or_default();
    let to = base + 8_000;
    let ranged =
        client.get_ok(&format!("/api/predictions?sensorId=cold&from={}&to={to}", from.replace('+', "%2B"))).await;
    assert_eq!(ranged["count"], 3, "{ranged}");

    // The jump raises an alert of the default `anomaly` rule: one per incident (a run
    // of anomalous windows), with the window that started it and what drove the score.
    let alerts = client.get_ok("/api/alerts?sensorId=hot").await;
    let jump_start = chrono::DateTime::from_timestamp_millis(base + 11_000)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let jump = alerts["items"]
        .as_array()
        .and_then(|items| items.iter().find(|a| a["startedAt"] == jump_start.as_str()))
        .unwrap_or_else(|| panic!("no alert started at the jump window {jump_start}: {alerts}"));
    assert_eq!(
        (&jump["rule"], &jump["kind"], &jump["sensorId"]),
        (&json!("anomaly"), &json!("anomaly"), &json!("hot"))
    );
    assert_eq!(jump["windowStart"], jump_start.as_str());
    assert!(jump["state"] == "firing" || jump["state"] == "resolved", "{jump}");
    assert!(jump["message"].as_str().unwrap_or("").contains("σ above"), "{jump}");
    let anomalies = client.get_ok("/api/predictions?anomaly=true&limit=1000").await;
    let hot_anomalies = client.get_ok("/api/predictions?anomaly=true&sensorId=hot").await;
    let (alert_count, hot_count) =
        (alerts["count"].as_u64().unwrap_or(0), hot_anomalies["count"].as_u64().unwrap_or(0));
    assert!((1..=hot_count).contains(&alert_count), "{alert_count} alerts for {hot_count} anomalous windows");
    assert!(anomalies["count"].as_u64().unwrap_or(0) >= 1);
    let rule_filtered = client.get_ok("/api/alerts?sensorId=hot&rule=anomaly").await;
    assert_eq!(rule_filtered["count"], alerts["count"]);
    assert_eq!(client.get_ok("/api/alerts?rule=no_such_rule").await["count"], 0);
    let rules = client.get_ok("/api/rules").await;
    assert_eq!(rules["items"][0]["name"], "anomaly", "{rules}");

    // Top sensors and summary.
    let top = client.get_ok("/api/sensors/top?minutes=10&by=maxValue&n=2&eventType=temperature").await;
    let names: Vec<&str> =
        top["items"].as_array().expect("items").iter().filter_map(|t| t["sensorId"].as_str()).collect();
    assert_eq!(names, vec!["hot", "warm"]);
    assert_eq!(top["items"][0]["value"], 80.5);
    let by_count = client.get_ok("/api/sensors/top?minutes=10&by=eventCount&n=1").await;
    assert_eq!(by_count["items"][0]["value"], 49.0);
    let summary = client.get_ok("/api/summary?minutes=10").await;
    let types = summary["eventTypes"].as_array().expect("eventTypes");
    assert_eq!(types.len(), 2);
    let temperature = types.iter().find(|t| t["eventType"] == "temperature").expect("temperature");
    assert_eq!(temperature["windows"], 39);
    assert_eq!(temperature["events"], 3 * 49);
    assert_eq!(temperature["sensors"], 3);
    assert!(temperature["anomalies"].as_i64().unwrap_or(0) >= 1);
    runtime.shutdown().await;
}

/// Ownership epochs: once another owner took a partition, a checkpoint of the earlier
/// owner (a rebalance it has not noticed yet) is refused with its key states, and the
/// new owner's checkpoint stands.
async fn a_stale_owner_cannot_overwrite_a_checkpoint(backend: Backend) {
    use tidemark::messages::{CheckpointData, KeyStateBlob, PartitionCounters};
    use tidemark::store::WriteBatch;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = common::config(sources_on(backend, dir.path()).await);
    let store = tidemark::store::open(&config.store).await.expect("store");
    let checkpoint = |epoch: u64, position: u64, state: u8| CheckpointData {
        partition: 2,
        partitions: 4,
        next_position: position,
        clock_ms: 0,
        checkpoint_id: position,
        taken_at_ms: 0,
        owner_epoch: epoch,
        counters: PartitionCounters { events_processed: position, ..PartitionCounters::default() },
        upserts: vec![KeyStateBlob { sensor_id: "s".into(), event_type: "t".into(), state: vec![state] }],
        deletes: Vec::new(),
    };
    let write = |checkpoint: CheckpointData| {
        let store = std::sync::Arc::clone(&store);
        async move {
            let batch = [checkpoint];
            store.write(&WriteBatch { checkpoints: &batch, ..WriteBatch::default() }).await.expect("write")
        }
    };
    let old = store.acquire_partition(2, "old-owner").await.expect("acquire");
    assert!(write(checkpoint(old, 100, 1)).await.fenced.is_empty());
    let new = store.acquire_partition(2, "new-owner").await.expect("acquire");
    assert!(new > old, "epochs grow: {old} then {new}");
    let restored = store.load_checkpoint(2, 4).await.expect("load").expect("a checkpoint");
    assert_eq!(restored.next_position, 100, "the new owner starts from what the old one completed");
    assert!(write(checkpoint(new, 150, 2)).await.fenced.is_empty());
    let outcome = write(checkpoint(old, 180, 3)).await;
    assert_eq!(outcome.fenced, vec![(2, 180)], "the stale owner's checkpoint is refused");
    let restored = store.load_checkpoint(2, 4).await.expect("load").expect("a checkpoint");
    assert_eq!(restored.next_position, 150);
    assert_eq!(restored.counters.events_processed, 150);
    assert_eq!(restored.keys[0].state, vec![2], "nor did its key states land");
    store.close().await;
}

async fn a_broken_clock_or_a_huge_value_is_rejected_and_harms_nothing(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources_on(backend, dir.path())
            .await
            .with("pipeline.window", "10s")
            .with("pipeline.max_out_of_orderness", "2s")
            .with("pipeline.idle_timeout", "1h"),
    )
    .await;
    let client = Client::new(&runtime);
    let now = chrono::Utc::now().timestamp_millis();
    let at = |sensor: &str, value: f64, time: i64| json!({"sensorId": sensor, "eventType": "temperature", "value": value, "timestamp": time});
    let year_2100 = 4_102_444_800_000;
    let (status, body) = client
        .post_json(&json!([
            at("s-1", 1.0, now - 60_000),
            at("s-1", 2.0, year_2100),
            at("s-2", 1.7e308, now - 60_000),
            at("s-1", 3.0, now - 59_000)
        ]))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(2), Some(2)), "{body}");
    assert_eq!(body["errors"][0]["index"], 1);
    assert_eq!(body["errors"][0]["reason"], "clock_skew");
    assert_eq!(body["errors"][0]["field"], "timestamp");
    let message = body["errors"][0]["error"].as_str().unwrap_or("");
    assert!(message.contains("2100-01-01") && message.contains("max_future_skew"), "{message}");
    assert_eq!(body["errors"][1]["reason"], "invalid_value");
    assert_eq!(body["errors"][1]["field"], "value");

    // The sensor's later, correct events are not late: its watermark never saw 2100.
    for (value, time) in [(4.0, now - 50_000), (5.0, now - 30_000)] {
        let (status, body) = client.post_json(&at("s-1", value, time)).await;
        assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)), "{body}");
    }
    eventually(Duration::from_secs(15), "s-1's first three events in fired windows", || async {
        let page = client.get_ok("/api/predictions?sensorId=s-1").await;
        let counted: u64 = page["items"].as_array()?.iter().filter_map(|row| row["eventCount"].as_u64()).sum();
        (counted == 3).then_some(())
    })
    .await;
    let late = client.get_ok("/api/dead-letters?reason=late").await;
    assert_eq!(late["count"], 0, "{late}");

    let skew = eventually(Duration::from_secs(15), "s-1 listed as skewed", || async {
        let skew = client.get_ok("/api/sensors/skew").await;
        (skew["count"] == 1).then_some(skew)
    })
    .await;
    assert_eq!(skew["items"][0]["sensorId"], "s-1", "{skew}");
    assert_eq!(skew["items"][0]["rejected"], 1, "{skew}");
    let offset = skew["items"][0]["medianOffsetMs"].as_i64().unwrap_or(0);
    assert!(offset > 70 * 365 * 86_400_000, "a clock about 74 years ahead: {skew}");
    let letters = client.get_ok("/api/dead-letters?reason=clock_skew").await;
    assert_eq!(letters["items"][0]["eventTime"], "2100-01-01T00:00:00.000Z", "{letters}");
    runtime.shutdown().await;
}

/// SQLite's write-ahead log stays bounded: past `store.sqlite_wal_max_bytes` it is
/// checkpointed in full and truncated (a PASSIVE checkpoint alone leaves the file at its
/// high-water mark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_is_truncated_past_its_limit() {
    use tidemark::messages::{DeadLetter, RejectReason, Source};
    use tidemark::store::WriteBatch;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = common::config(common::sources(dir.path()).with("store.sqlite_wal_max_bytes", 1 << 20));
    let store = tidemark::store::open(&config.store).await.expect("store");
    let letters: Vec<DeadLetter> = (0..1000)
        .map(|i| DeadLetter {
            received_at_ms: T0,
            source: Source::Http,
            reason: RejectReason::Unparsable,
            error: format!("event {i}: unparsable"),
            sensor_id: None,
            event_type: None,
            event_time_ms: None,
            partition: None,
            position: None,
            payload: "x".repeat(1000),
        })
        .collect();
    for _ in 0..10 {
        store.write(&WriteBatch { dead_letters: &letters, ..WriteBatch::default() }).await.expect("write");
    }
    let wal = dir.path().join("tidemark.db-wal");
    let peak = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(peak > 4 << 20, "the writes grew the WAL first: {peak} bytes");
    eventually(Duration::from_secs(10), "the WAL truncated", || async {
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        (size <= 1 << 20).then_some(())
    })
    .await;
    store.close().await;
}

/// Slow clients do not hold connections: a header that never completes, a connection
/// that sends nothing, and a body that stops arriving are all cut off, and the server
/// keeps answering everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        common::sources(dir.path())
            .with("http.header_read_timeout", "1s")
            .with("http.body_read_timeout", "1s")
            .with("http.max_connections", 64),
    )
    .await;
    let addr = runtime.addr();
    let mut half_headers = Vec::new();
    for _ in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.expect("write");
        half_headers.push(stream);
    }
    let silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut slow_body = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow_body
        .write_all(
            b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[",
        )
        .await
        .expect("write");
    // Everyone else is still served.
    let client = Client::new(&runtime);
    assert_eq!(client.get_ok("/health").await["status"], "ok");

    let started = std::time::Instant::now();
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut buffer = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buffer)).await {
            Ok(_) => String::from_utf8_lossy(&buffer).to_string(),
            Err(_) => panic!("the server kept a slow connection open for 10 s"),
        }
    };
    for stream in half_headers {
        closed(stream).await;
    }
    let answer = closed(slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    closed(silent).await;
    assert!(started.elapsed() < Duration::from_secs(5), "cut off after about the timeouts: {:?}", started.elapsed());
    assert_eq!(client.get_ok("/health").await["status"], "ok");
    runtime.shutdown().await;
}

/// Requests the HTTP parser refuses before any handler runs (a URI or header too
/// large, a malformed request line) and methods a route does not take still get the
/// JSON error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_have_the_json_error_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(common::sources(dir.path())).await;
    let addr = runtime.addr();
    let exchange = |request: Vec<u8>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&request).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .expect("read");
        let answer = String::from_utf8(answer).expect("utf-8");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {answer}"));
        (head.lines().next().unwrap_or_default().to_string(), error["error"]["code"].as_str().unwrap_or("").to_string())
    };
    let long_uri = format!("GET /api/predictions?sensorId={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    assert_eq!(exchange(long_uri.into_bytes()).await, ("HTTP/1.1 414 URI Too Long".into(), "uri_too_long".into()));
    let big_header = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(200_000));
    let expected = ("HTTP/1.1 431 Request Header Fields Too Large".to_string(), "header_too_large".to_string());
    assert_eq!(exchange(big_header.into_bytes()).await, expected);
    let many_fields: String = (0..200).map(|i| format!("X-F{i}: 1\r\n")).collect();
    let many_fields = format!("GET /health HTTP/1.1\r\nHost: x\r\n{many_fields}\r\n");
    assert_eq!(exchange(many_fields.into_bytes()).await, expected);
    assert_eq!(exchange(b"GARBAGE\r\n\r\n".to_vec()).await, ("HTTP/1.1 400 Bad Request".into(), "bad_request".into()));
    let put = b"PUT /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec();
    assert_eq!(exchange(put).await, ("HTTP/1.1 405 Method Not Allowed".into(), "method_not_allowed".into()));
    // The server is fine afterwards, and ids with invisible characters are refused.
    let client = Client::new(&runtime);
    let (status, body) = client.post_json(&json!({"sensorId": "s\u{202e}1", "eventType": "t", "value": 1})).await;
    assert_eq!((status, &body["accepted"], &body["rejected"]), (202, &json!(0), &json!(1)), "{body}");
    assert!(body["errors"][0]["error"].as_str().unwrap_or("").contains("bidirectional"), "{body}");
    runtime.shutdown().await;
}

/// A client past `http.rate_limit_per_second` gets 429 with `Retry-After`; buckets are
/// per API key (or per IP address), and probes are never limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_their_rate_get_429() {
    use tidemark::auth::hash_key;
    let dir = tempfile::tempdir().expect("temp dir");
    let keys_file = dir.path().join("keys.toml");
    let entry = |name: &str, key: &str| {
        format!("[[api_keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n", hash_key(key))
    };
    std::fs::write(&keys_file, entry("a", "key-a") + &entry("b", "key-b")).expect("keys file");
    let runtime = start(
        common::sources(dir.path())
            .with("auth.keys_file", keys_file.to_string_lossy().to_string())
            .with("http.rate_limit_per_second", 2)
            .with("http.rate_limit_burst", 5),
    )
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", runtime.addr());
    let get = |path: &str, key: &str| http.get(format!("{base}{path}")).bearer_auth(key).send();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..10 {
        let response = get("/api/predictions", "key-a").await.expect("request");
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
            let body: Value = response.json().await.expect("JSON");
            limited = Some((retry_after, body));
        }
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 5, "the burst, then 429: {statuses:?}");
    let (retry_after, body) = limited.expect("a 429");
    assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("API key \"a\""), "{body}");
    // Another key has its own bucket; probes are not limited.
    assert_eq!(get("/api/predictions", "key-b").await.expect("request").status(), 200);
    for _ in 0..20 {
        assert_eq!(http.get(format!("{base}/health")).send().await.expect("request").status(), 200);
    }
    // The bucket refills at the rate.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get("/api/predictions", "key-a").await.expect("request").status(), 200);
    runtime.shutdown().await;
}

/// JWT bearer tokens (RS256, a key pair made with the openssl CLI): scopes from the
/// token, issuer and audience checked, expired tokens refused, API keys still working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_tokens_are_verified() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (private, public) = (dir.path().join("jwt.key"), dir.path().join("jwt.pub"));
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl").args(args).status().unwrap_or_else(|e| {
            panic!("this test makes an RSA key with the openssl CLI ({e}); install it: apt-get install openssl")
        });
        assert!(status.success(), "openssl {args:?}");
    };
    let private_path = private.to_string_lossy().to_string();
    let public_path = public.to_string_lossy().to_string();
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &private_path]);
    openssl(&["pkey", "-in", &private_path, "-pubout", "-out", &public_path]);
    let runtime = start(
        common::sources(dir.path())
            .with("auth.jwt_rs256_public_key_file", public_path)
            .with("auth.jwt_issuer", "https://idp.example")
            .with("auth.jwt_audience", "tidemark"),
    )
    .await;
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&private).expect("key")).expect("RSA key");
    let now = chrono::Utc::now().timestamp();
    let token = |scope: &str, exp: i64| {
        let claims = json!({"sub": "svc", "iss": "https://idp.example", "aud": "tidemark", "exp": exp, "scope": scope});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, &signing)
            .expect("token")
    };
    let http = reqwest::Client::new();
    let base = format!("http://{}", runtime.addr());
    let ingest = token("tidemark:ingest", now + 300);
    let read = token("read", now + 300);
    let post = |bearer: String| {
        http.post(format!("{base}/api/events")).bearer_auth(bearer).json(&event("j-1", 1.0, 1_000)).send()
    };
    assert_eq!(post(ingest.clone()).await.expect("request").status(), 202);
    assert_eq!(post(read.clone()).await.expect("request").status(), 403);
    let expired = post(token("ingest", now - 3_600)).await.expect("request");
    assert_eq!(expired.status(), 401);
    let body: Value = expired.json().await.expect("JSON");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("expired"), "{body}");
    let reading = http.get(format!("{base}/api/predictions")).bearer_auth(&read).send().await.expect("request");
    assert_eq!(reading.status(), 200);
    assert_eq!(http.get(format!("{base}/api/predictions")).send().await.expect("request").status(), 401);
    runtime.shutdown().await;
}

/// CORS is closed by default and open only to the configured origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_unless_configured() {
    let http = reqwest::Client::new();
    let preflight = |base: String, origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, format!("{base}/api/events"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "content-type")
            .send()
    };
    let allowed = |response: &reqwest::Response| {
        response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()).map(String::from)
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(common::sources(dir.path())).await;
    let base = format!("http://{}", runtime.addr());
    let response = preflight(base.clone(), "https://evil.example").await.expect("preflight");
    assert_eq!(allowed(&response), None, "no origin is allowed by default");
    runtime.shutdown().await;

    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        common::sources(dir.path()).with("http.cors_allowed_origins", vec!["https://grafana.example.com".to_string()]),
    )
    .await;
    let base = format!("http://{}", runtime.addr());
    let response = preflight(base.clone(), "https://grafana.example.com").await.expect("preflight");
    assert_eq!(allowed(&response).as_deref(), Some("https://grafana.example.com"));
    let response = preflight(base.clone(), "https://evil.example").await.expect("preflight");
    assert_eq!(allowed(&response), None);
    let response = http
        .get(format!("{base}/api/summary"))
        .header("Origin", "https://grafana.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(allowed(&response).as_deref(), Some("https://grafana.example.com"));
    runtime.shutdown().await;
}

/// A flood of the same invalid event from one client: the first `sample_limit` of each
/// window are stored, the rest counted, and one summary dead letter says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_rejections_are_sampled_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        common::sources(dir.path())
            .with("dead_letters.sample_limit", 10)
            .with("dead_letters.sample_window", "2s")
            .with("dead_letters.prune_every", "200ms"),
    )
    .await;
    let client = Client::new(&runtime);
    let flood: Vec<String> =
        (0..500).map(|i| json!({"sensorId": format!("s-{i}"), "eventType": "t", "value": "hot"}).to_string()).collect();
    let (status, body) = client.post("/api/events", "application/x-ndjson", flood.join("\n")).await;
    assert_eq!((status, &body["rejected"]), (202, &json!(500)), "every rejection is still answered: {body}");
    let summary = eventually(Duration::from_secs(15), "10 samples and one summary", || async {
        let page = client.get_ok("/api/dead-letters?limit=100").await;
        (page["count"] == 11).then(|| page["items"][0].clone())
    })
    .await;
    let error = summary["error"].as_str().unwrap_or("");
    assert!(error.starts_with("490 more events from client 127.0.0.1 rejected as wrong_type"), "{summary}");
    assert!(summary["payload"].as_str().unwrap_or("").contains("s-499"), "{summary}");
    let metrics =
        reqwest::get(format!("http://{}/metrics", runtime.addr())).await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.contains(r#"tidemark_dead_letters_sampled_total{source="http",reason="wrong_type"} 490"#),
        "{}",
        metrics.lines().filter(|l| l.contains("sampled")).collect::<Vec<_>>().join("\n")
    );
    runtime.shutdown().await;
}

/// Requests are served by the HTTP runtime's own threads, apart from the pipeline's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_on_threads_of_their_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(common::sources(dir.path()).with("http.worker_threads", 2)).await;
    let client = Client::new(&runtime);
    assert_eq!(client.get_ok("/health").await["status"], "ok");
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(names.iter().filter(|name| *name == "tidemark-http").count() >= 2, "{names:?}");
    runtime.shutdown().await;
}

/// API keys with scopes: probes stay open, everything else needs a key with the right
/// scope, and answers say what is missing without echoing the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_endpoint_by_scope() {
    use tidemark::auth::hash_key;
    let dir = tempfile::tempdir().expect("temp dir");
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(
        &keys_file,
        format!("[[api_keys]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n", hash_key("k-admin")),
    )
    .expect("keys file");
    let runtime = start(
        common::sources(dir.path()).with("auth.keys_file", keys_file.display().to_string()).with(
            "auth.api_keys",
            toml::Value::try_from(json!([
                {"name": "devices", "sha256": hash_key("k-ingest"), "scopes": ["ingest"]},
                {"name": "grafana", "sha256": hash_key("k-read"), "scopes": ["read"]},
            ]))
            .expect("toml"),
        ),
    )
    .await;
    let base = format!("http://{}", runtime.addr());
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut request = http.request(method.clone(), format!("{base}{path}"));
        if method == reqwest::Method::POST {
            request = request.header("content-type", "application/json").body(event("s-1", 1.0, 0).to_string());
        }
        if let Some(key) = key {
            request = if key == "k-ingest" {
                request.header("x-api-key", key)
            } else {
                request.header("authorization", format!("Bearer {key}"))
            };
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").is_some();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, challenge, body)
        }
    };
    use reqwest::Method;
    for path in ["/health", "/ready"] {
        assert_eq!(call(Method::GET, path, None).await.0, 200, "{path} stays open for probes");
    }
    let (status, challenge, body) = call(Method::GET, "/api/predictions", None).await;
    assert_eq!((status, challenge), (401, true), "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("read"), "{body}");
    let (status, _, body) = call(Method::GET, "/api/predictions", Some("tdm_guess")).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.to_string().contains("tdm_guess"), "the key is not echoed: {body}");
    let cases = [
        (Method::GET, "/api/predictions", "k-ingest", 403),
        (Method::GET, "/api/predictions", "k-read", 200),
        (Method::GET, "/api/predictions", "k-admin", 200),
        (Method::POST, "/api/events", "k-read", 403),
        (Method::POST, "/api/events", "k-ingest", 202),
        (Method::GET, "/metrics", "k-read", 403),
        (Method::GET, "/api/status", "k-read", 403),
        (Method::GET, "/metrics", "k-admin", 200),
        (Method::GET, "/api/status", "k-admin", 200),
    ];
    for (method, path, key, expected) in cases {
        let (status, _, body) = call(method.clone(), path, Some(key)).await;
        assert_eq!(status, expected, "{method} {path} with {key}: {body}");
        if expected == 403 {
            assert_eq!(body["error"]["code"], "forbidden");
            assert!(!body.to_string().contains(key), "{body}");
        }
    }
    runtime.shutdown().await;

    // Without keys, a non-loopback address is refused (nothing is bound to it).
    let error = tidemark::runtime::Runtime::start(common::config(
        common::sources(dir.path()).with("http.listen", "0.0.0.0:0").with("ingest.durability", "memory"),
    ))
    .await
    .err()
    .expect("refused");
    let message = format!("{error:#}");
    assert!(message.contains("not a loopback address") && message.contains("allow_unauthenticated"), "{message}");
}

async fn the_dead_letter_store_is_bounded(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources_on(backend, dir.path())
            .await
            .with("dead_letters.max_rows", 50)
            .with("dead_letters.max_pending", 300)
            .with("dead_letters.prune_every", "100ms"),
    )
    .await;
    let client = Client::new(&runtime);
    let invalid = |n: usize| {
        (0..n)
            .map(|i| json!({"sensorId": format!("s-{i}"), "eventType": "t", "value": "hot"}).to_string())
            .collect::<Vec<_>>()
    };
    // More invalid events in one request than could ever be kept: 413, not a retry loop.
    let (status, body) = client.post("/api/events", "application/x-ndjson", invalid(301).join("\n")).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("dead_letters.max_pending"), "{body}");
    // Rejected events wait for the store like accepted ones: past max_pending a request
    // gets 503 and succeeds once the store caught up.
    let mut refused = 0;
    for _ in 0..4 {
        let mut attempts = 0;
        loop {
            let (status, body) = client.post("/api/events", "application/x-ndjson", invalid(100).join("\n")).await;
            if status == 503 && attempts < 100 {
                assert_eq!(body["error"]["code"], "dead_letter_backpressure", "{body}");
                refused += 1;
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(status, 202, "{body}");
            break;
        }
    }
    eprintln!("{refused} requests refused while the store caught up");
    // Retention keeps the newest 50.
    eventually(Duration::from_secs(15), "the dead letters pruned to 50", || async {
        let page = client.get_ok("/api/dead-letters?limit=1000").await;
        (page["count"] == 50).then_some(())
    })
    .await;
    let newest = client.get_ok("/api/dead-letters?limit=1").await;
    assert!(newest["items"][0]["error"].as_str().unwrap_or("").starts_with("event 99:"), "{newest}");
    runtime.shutdown().await;
}

/// `pipeline.max_keys_per_partition` refuses keys past the limit (dead letters with
/// reason `key_limit`); `pipeline.key_ttl` takes idle keys out of memory and the
/// checkpoints, and their tombstones (kept across a restart) still make an event for a
/// window already fired late instead of replacing that window's result.
async fn keys_are_bounded_and_idle_keys_leave(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sources = sources_on(backend, dir.path())
        .await
        .with("pipeline.partitions", 1)
        .with("pipeline.window", "10s")
        .with("pipeline.idle_timeout", "1s")
        .with("pipeline.key_ttl", "2s")
        .with("pipeline.max_keys_per_partition", 10);
    let runtime = start(sources.clone()).await;
    let client = Client::new(&runtime);
    let batch: Vec<Value> = (0..15).map(|i| event(&format!("k-{i}"), 1.0, 1_000)).collect();
    let (status, body) = client.post_json(&Value::Array(batch)).await;
    assert_eq!((status, &body["accepted"]), (202, &json!(15)), "{body}");
    let refused = eventually(Duration::from_secs(15), "5 key_limit dead letters", || async {
        let page = client.get_ok("/api/dead-letters?reason=key_limit").await;
        (page["count"] == 5).then_some(page)
    })
    .await;
    let error = refused["items"][0]["error"].as_str().unwrap_or("");
    assert!(error.contains("max_keys_per_partition") && error.contains("k-1"), "{refused}");
    // Idle for the TTL: the ten keys leave (after their windows fired).
    eventually(Duration::from_secs(20), "the idle keys evicted", || async {
        let status = client.get_ok("/api/status").await;
        (status["partitions"][0]["openKeys"] == 0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(15), "each kept key's window stored once", || async {
        (common::all_predictions(&client).await.len() == 10).then_some(())
    })
    .await;
    // An event for k-0's fired window is late (tombstone); a later window and nine new
    // keys are accepted now that there is room (k-0 is the tenth).
    let (status, body) = client.post_json(&json!([event("k-0", 50.0, 2_000), event("k-0", 7.0, 25_000)])).await;
    assert_eq!(status, 202, "{body}");
    let batch: Vec<Value> = (20..29).map(|i| event(&format!("k-{i}"), 1.0, 1_000)).collect();
    let (status, _) = client.post_json(&Value::Array(batch)).await;
    assert_eq!(status, 202);
    eventually(Duration::from_secs(15), "one late dead letter for k-0", || async {
        let page = client.get_ok("/api/dead-letters?reason=late&sensorId=k-0").await;
        (page["count"] == 1).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "the new keys' windows", || async {
        (common::all_predictions(&client).await.len() == 20).then_some(())
    })
    .await;
    let first = client.get_ok("/api/predictions?sensorId=k-0").await;
    let counts: Vec<_> = first["items"].as_array().into_iter().flatten().map(|p| p["eventCount"].clone()).collect();
    assert_eq!(counts, vec![json!(1), json!(1)], "k-0's first window kept its count: {first}");
    runtime.shutdown().await;

    // After a restart the tombstones still hold: k-1's fired window stays closed (once
    // the ten keys of the last round left too, so k-1 has room to come back).
    let runtime = start(sources).await;
    let client = Client::new(&runtime);
    eventually(Duration::from_secs(20), "the keys evicted again", || async {
        let status = client.get_ok("/api/status").await;
        (status["partitions"][0]["openKeys"] == 0).then_some(())
    })
    .await;
    let (status, body) = client.post_json(&event("k-1", 50.0, 3_000)).await;
    assert_eq!(status, 202, "{body}");
    eventually(Duration::from_secs(15), "one late dead letter for k-1", || async {
        let page = client.get_ok("/api/dead-letters?reason=late&sensorId=k-1").await;
        (page["count"] == 1).then_some(())
    })
    .await;
    runtime.shutdown().await;
}
