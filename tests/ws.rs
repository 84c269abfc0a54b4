//! The live feed (`GET /ws`) with a real WebSocket client: subscriptions and filters,
//! `since` replays with no gap and no duplicate, a client that never reads, limits,
//! authentication, and the dashboard's assets.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{Client, post_batches, start, workload};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: std::net::SocketAddr, query: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws{query}"))
        .await
        .expect("the WebSocket handshake succeeds");
    socket
}

async fn send(socket: &mut Socket, request: Value) {
    socket.send(Message::text(request.to_string())).await.expect("request sent");
}

/// The next JSON message (pings are answered by the client library).
async fn next(socket: &mut Socket, within: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(within, socket.next()).await {
            Err(_) => return None,
            Ok(None) => return None,
            Ok(Some(Err(error))) => panic!("WebSocket error: {error}"),
            Ok(Some(Ok(Message::Text(text)))) => {
                return Some(serde_json::from_str(text.as_str()).expect("every message is JSON"));
            }
            Ok(Some(Ok(Message::Close(frame)))) => panic!("closed by the server: {frame:?}"),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn expect_kind(socket: &mut Socket, kind: &str) -> Value {
    let message = next(socket, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("no {kind} message"));
    assert_eq!(message["kind"], kind, "{message}");
    message
}

/// Every message until none arrives for `quiet`.
async fn drain(socket: &mut Socket, quiet: Duration) -> Vec<Value> {
    let mut messages = Vec::new();
    while let Some(message) = next(socket, quiet).await {
        messages.push(message);
    }
    messages
}

fn sources(dir: &std::path::Path) -> tidemark::config::ConfigSources {
    common::sources(dir)
        .with("pipeline.window", "1s")
        .with("pipeline.max_out_of_orderness", "0s")
        .with("pipeline.idle_timeout", "1h")
        .with("pipeline.partitions", 2)
        // Judge windows from the 10th, so the anomalies injected after 60 one-second
        // windows are scored (the default learns for 100).
        .with("scoring.learning_windows", 10)
}

fn sim(sensors: u32, seconds: u64, anomalies: u32) -> tidemark::sim::SimConfig {
    tidemark::sim::SimConfig {
        sensors,
        rate: f64::from(sensors) * 10.0,
        duration: Some(Duration::from_secs(seconds)),
        seed: 7,
        start_ms: 1_767_225_600_000,
        disorder: 0.0,
        anomalies,
        anomalies_after: Duration::from_secs(seconds / 2),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_receive_rest_shaped_messages_through_their_filters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(sources(dir.path())).await;
    let client = Client::new(&runtime);
    let mut socket = connect(runtime.addr(), "").await;
    send(&mut socket, json!({"subscribe": {"id": "mine", "kind": "predictions", "sensorId": ["sensor-0001"]}})).await;
    let subscribed = expect_kind(&mut socket, "subscribed").await;
    assert_eq!(subscribed["data"]["id"], "mine");
    assert_eq!(subscribed["data"]["sensorId"], json!(["sensor-0001"]));
    send(&mut socket, json!({"subscribe": {"kind": "alerts"}})).await;
    expect_kind(&mut socket, "subscribed").await;
    // A bad request is answered, and the connection goes on.
    send(&mut socket, json!({"subscribe": {"kind": "weather"}})).await;
    let error = expect_kind(&mut socket, "error").await;
    assert_eq!(error["data"]["code"], "invalid_request");
    assert!(error["data"]["message"].as_str().is_some_and(|m| m.contains("weather")), "{error}");

    let lines = workload(sim(8, 120, 4));
    assert_eq!(post_batches(&client, &lines, 500, Duration::from_millis(50)).await, lines.len() as u64);
    runtime.flush_all(Duration::from_secs(30)).await.expect("flushed");
    let messages = drain(&mut socket, Duration::from_secs(2)).await;

    let stored = common::all_predictions(&client).await;
    let by_id: HashMap<i64, &Value> = stored.iter().map(|row| (row["id"].as_i64().expect("id"), row)).collect();
    let mut predictions = BTreeMap::new();
    for message in messages.iter().filter(|m| m["kind"] == "predictions") {
        let data = &message["data"];
        let id = data["id"].as_i64().expect("an id, as in the REST shape");
        let row = by_id.get(&id).unwrap_or_else(|| panic!("{message} is not a stored row"));
        assert_eq!(data["sensorId"], "sensor-0001", "the filter lets only sensor-0001 through");
        predictions.insert(id, data.clone());
        // The same fields and values as GET /api/predictions (the last revision).
        if data["revision"] == row["revision"] {
            for field in ["sensorId", "eventType", "windowStart", "windowEnd", "eventCount", "avgValue", "severity"] {
                assert_eq!(data[field], row[field], "{field} of {message}");
            }
        }
    }
    let expected_predictions: Vec<i64> =
        stored.iter().filter(|r| r["sensorId"] == "sensor-0001").map(|r| r["id"].as_i64().unwrap_or(0)).collect();
    assert!(expected_predictions.len() >= 100, "{} windows of sensor-0001", expected_predictions.len());
    assert_eq!(predictions.keys().copied().collect::<Vec<_>>(), sorted(expected_predictions));
    // Every stored alert arrived, its last message in the REST shape of GET /api/alerts.
    assert!(messages.iter().all(|m| m["kind"] == "predictions" || m["kind"] == "alerts"), "{messages:?}");
    let stored_alerts = stored_alerts(&client).await;
    assert!(!stored_alerts.is_empty(), "the injected anomalies raise alerts");
    assert_eq!(last_alert_messages(&messages), stored_alerts);

    // Unsubscribed: nothing more arrives for it.
    send(&mut socket, json!({"unsubscribe": {"id": "mine"}})).await;
    let unsubscribed = expect_kind(&mut socket, "unsubscribed").await;
    assert_eq!(unsubscribed["data"]["ids"], json!(["mine"]));
    let later = workload(tidemark::sim::SimConfig { start_ms: 1_767_225_600_000 + 200_000, ..sim(8, 20, 0) });
    post_batches(&client, &later, 500, Duration::from_millis(50)).await;
    runtime.flush_all(Duration::from_secs(30)).await.expect("flushed");
    let after = drain(&mut socket, Duration::from_secs(1)).await;
    assert!(after.iter().all(|m| m["kind"] != "predictions"), "{:?}", after.first());
    runtime.shutdown().await;
}

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

/// A subscription with `since` while events keep arriving: the replay and the live
/// stream together carry every stored version once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_the_store_then_goes_live_with_no_gap_and_no_duplicate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(sources(dir.path()).with("store.linger", "1ms")).await;
    let client = Client::new(&runtime);
    let mut config = sim(50, 240, 0);
    config.disorder = 0.02;
    config.max_disorder = Duration::from_secs(3);
    let lines = workload(config);
    let (first, rest) = lines.split_at(lines.len() / 3);
    post_batches(&client, first, 1000, Duration::from_millis(50)).await;
    runtime.flush_sinks(Duration::from_secs(30)).await.expect("flushed");

    // Subscribe in the middle of a stream: results are committed while the replay reads.
    let posting = {
        let client = Client::new(&runtime);
        let rest = rest.to_vec();
        tokio::spawn(async move {
            // Paced, so the stream is still flowing when the subscription replays.
            let mut accepted = 0;
            for chunk in rest.chunks(500) {
                accepted += post_batches(&client, chunk, 500, Duration::from_millis(20)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut socket = connect(runtime.addr(), "").await;
    send(&mut socket, json!({"subscribe": {"kind": "predictions", "since": 0}})).await;
    expect_kind(&mut socket, "subscribed").await;
    // Read as a client does, while the stream goes on.
    let reading = tokio::spawn(async move { drain(&mut socket, Duration::from_secs(3)).await });
    let posted = posting.await.expect("posting task");
    assert_eq!(posted, rest.len() as u64);
    runtime.flush_all(Duration::from_secs(30)).await.expect("flushed");
    let messages = reading.await.expect("reading task");
    let lagged: Vec<_> = messages.iter().filter(|m| m["kind"] == "lagged").collect();
    assert!(lagged.is_empty(), "a client that reads does not lag: {lagged:?}");

    let replayed = messages.iter().find(|m| m["kind"] == "replayed").expect("the replay's end is marked");
    let replayed_rows = replayed["data"]["rows"].as_u64().expect("rows");
    assert!(replayed_rows > 0, "the first third was stored before the subscription");
    let mut versions: HashMap<(i64, i64), usize> = HashMap::new();
    let mut newest: HashMap<i64, i64> = HashMap::new();
    for message in messages.iter().filter(|m| m["kind"] == "predictions") {
        let id = message["data"]["id"].as_i64().expect("id");
        let revision = message["data"]["revision"].as_i64().expect("revision");
        *versions.entry((id, revision)).or_default() += 1;
        let seen = newest.entry(id).or_insert(revision);
        *seen = (*seen).max(revision);
    }
    let duplicates: Vec<_> = versions.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicates.is_empty(), "versions sent twice: {duplicates:?}");
    let stored = common::all_predictions(&client).await;
    let live = versions.len() as u64 - replayed_rows;
    assert!(live > 100, "most windows arrived live ({live})");
    let mut missing = Vec::new();
    for row in &stored {
        let id = row["id"].as_i64().expect("id");
        if newest.get(&id) != row["revision"].as_i64().as_ref() {
            missing.push(row.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} stored rows never arrived in their stored version: {:?}",
        missing.len(),
        stored.len(),
        missing.first()
    );

    // A window start as since: exactly the stored windows from there.
    let from = stored[stored.len() / 2]["windowStart"].as_str().expect("time").to_string();
    let mut socket = connect(runtime.addr(), "").await;
    send(&mut socket, json!({"subscribe": {"kind": "predictions", "since": from}})).await;
    expect_kind(&mut socket, "subscribed").await;
    let replay = drain(&mut socket, Duration::from_secs(1)).await;
    let from_ms = chrono::DateTime::parse_from_rfc3339(&from).expect("rfc3339").timestamp_millis();
    let expected = stored
        .iter()
        .filter(|r| {
            chrono::DateTime::parse_from_rfc3339(r["windowStart"].as_str().unwrap_or_default())
                .is_ok_and(|t| t.timestamp_millis() >= from_ms)
        })
        .count();
    assert_eq!(replay.iter().filter(|m| m["kind"] == "predictions").count(), expected);
    assert_eq!(replay.last().map(|m| m["kind"].clone()), Some(json!("replayed")));
    runtime.shutdown().await;
}

/// A client that subscribes to every event and never reads is cut off; ingestion
/// carries on and every event counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_ingestion_carries_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime =
        start(sources(dir.path()).with("ws.queue_capacity", 64).with("ws.max_lag", "1s").with("ws.send_timeout", "2s"))
            .await;
    let client = Client::new(&runtime);
    let mut stuck = connect(runtime.addr(), "").await;
    send(&mut stuck, json!({"subscribe": {"kind": "events"}})).await;
    send(&mut stuck, json!({"subscribe": {"kind": "predictions"}})).await;
    // A healthy client beside it.
    let mut healthy = connect(runtime.addr(), "").await;
    send(&mut healthy, json!({"subscribe": {"kind": "alerts"}})).await;
    expect_kind(&mut healthy, "subscribed").await;

    let lines = workload(sim(200, 120, 3));
    let accepted = post_batches(&client, &lines, 2000, Duration::from_millis(50)).await;
    assert_eq!(accepted, lines.len() as u64);
    runtime.flush_all(Duration::from_secs(30)).await.expect("flushed");
    let metrics = runtime.metrics().render();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("tidemark_ws_messages_dropped_total") > 0.0, "the stuck client's queue overflowed:\n{metrics}");
    common::eventually(Duration::from_secs(15), "the stuck client to be closed", || async {
        let metrics = runtime.metrics().render();
        let cut = ["lagged", "send_timeout"]
            .iter()
            .filter(|reason| metrics.contains(&format!("tidemark_ws_disconnects_total{{reason=\"{reason}\"}} 1")))
            .count();
        (cut == 1).then_some(())
    })
    .await;
    // Every event counted in the stored windows.
    let stored = common::all_predictions(&client).await;
    let counted: i64 = stored.iter().map(|row| row["eventCount"].as_i64().unwrap_or(0)).sum();
    assert_eq!(counted, lines.len() as i64);
    // The healthy client got every alert.
    let alerts = drain(&mut healthy, Duration::from_secs(1)).await;
    let expected = stored_alerts(&client).await;
    assert!(!expected.is_empty());
    assert_eq!(last_alert_messages(&alerts), expected);
    drop(stuck);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_keys_origins_status_and_pings() {
    use tidemark::auth::hash_key;
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("ws.max_connections", 2)
            .with("ws.ping_interval", "200ms")
            .with("ws.status_interval", "100ms")
            .with(
                "auth.api_keys",
                toml::Value::try_from(json!([
                    {"name": "wall", "sha256": hash_key("k-read"), "scopes": ["read"]},
                    {"name": "ops", "sha256": hash_key("k-admin"), "scopes": ["admin"]},
                ]))
                .expect("toml"),
            ),
    )
    .await;
    let addr = runtime.addr();
    let refused = |result: Result<_, tokio_tungstenite::tungstenite::Error>| match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => 101,
    };
    // No key, a wrong key: 401.
    assert_eq!(refused(tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.map(|_| ())), 401);
    assert_eq!(
        refused(tokio_tungstenite::connect_async(format!("ws://{addr}/ws?access_token=nope")).await.map(|_| ())),
        401
    );
    // Another site's page: 403, even with a key.
    let mut request = format!("ws://{addr}/ws?access_token=k-read").into_client_request().expect("request");
    request.headers_mut().insert("origin", "https://evil.example".parse().expect("header"));
    assert_eq!(refused(tokio_tungstenite::connect_async(request).await.map(|_| ())), 403);

    // A read key reads predictions but not the status.
    let mut reader = connect(addr, "?access_token=k-read").await;
    send(&mut reader, json!({"subscribe": {"kind": "status"}})).await;
    let error = expect_kind(&mut reader, "error").await;
    assert_eq!(error["data"]["code"], "forbidden");
    // The key in a header, as other clients send it; the status arrives every interval.
    let mut request = format!("ws://{addr}/ws").into_client_request().expect("request");
    request.headers_mut().insert("authorization", "Bearer k-admin".parse().expect("header"));
    let (mut admin, _) = tokio_tungstenite::connect_async(request).await.expect("admin connects");
    send(&mut admin, json!({"subscribe": {"kind": "status"}})).await;
    expect_kind(&mut admin, "subscribed").await;
    let status = expect_kind(&mut admin, "status").await;
    assert!(status["data"]["events"]["accepted"].is_u64(), "{status}");
    assert_eq!(status["data"]["websocketConnections"], 2);
    // ws.max_connections = 2: a third is refused with 503.
    assert_eq!(
        refused(tokio_tungstenite::connect_async(format!("ws://{addr}/ws?access_token=k-read")).await.map(|_| ())),
        503
    );
    // Pings arrive every 200 ms; the client library answers them, so the connection lives.
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Ping(_)))) = tokio::time::timeout(Duration::from_millis(500), reader.next()).await {
            pings += 1;
        }
    }
    assert!(pings >= 3, "{pings} pings in 2 s");
    // A client that stops answering pings is closed (its socket is not read at all).
    drop(admin);
    let _ = reader.close(None).await;
    let no_pong = || {
        let metrics = runtime.metrics().render();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("tidemark_ws_disconnects_total{reason=\"no_pong\"} "))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    common::eventually(Duration::from_secs(5), "the other connections to close", || async {
        (runtime.sinks().live().open_connections() == 0).then_some(())
    })
    .await;
    let before = no_pong();
    let silent = connect(addr, "?access_token=k-read").await;
    common::eventually(Duration::from_secs(5), "the silent client to be closed", || async {
        (no_pong() == before + 1).then_some(())
    })
    .await;
    drop(silent);
    runtime.shutdown().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(common::sources(dir.path())).await;
    let base = format!("http://{}", runtime.addr());
    let page = reqwest::get(format!("{base}/")).await.expect("page");
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().expect("text").to_string();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{policy}");
    let html = page.text().await.expect("html");
    assert!(html.contains("dashboard.js") && html.contains("dashboard.css"), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing is fetched from elsewhere");
    for (path, kind) in [("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")] {
        let asset = reqwest::get(format!("{base}{path}")).await.expect("asset");
        assert_eq!(asset.status(), 200);
        assert!(asset.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with(kind)));
        assert!(asset.text().await.expect("body").len() > 1000, "{path} has content");
    }
    // A plain GET on /ws says what it is.
    let plain = reqwest::get(format!("{base}/ws")).await.expect("answer");
    assert_eq!(plain.status(), 426);
    runtime.shutdown().await;
}

/// Partitions that panic and restart replay their events from the last checkpoint and
/// fire the same windows again: subscribers still get each stored version once.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_restarts_do_not_resend_windows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        sources(dir.path())
            .with("chaos.partition_panic_probability", 0.0002)
            .with("chaos.seed", 5)
            .with("supervision.max_restarts", 1000)
            .with("checkpoint.interval", "1s"),
    )
    .await;
    let client = Client::new(&runtime);
    let mut socket = connect(runtime.addr(), "").await;
    send(&mut socket, json!({"subscribe": {"kind": "predictions"}})).await;
    expect_kind(&mut socket, "subscribed").await;
    let reading = tokio::spawn(async move { drain(&mut socket, Duration::from_secs(3)).await });
    let lines = workload(sim(50, 240, 0));
    for chunk in lines.chunks(2000) {
        post_batches(&client, chunk, 2000, Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A partition may be restarting at the moment of the flush: ask again.
    common::eventually(Duration::from_secs(60), "every window flushed", || async {
        runtime.flush_all(Duration::from_secs(10)).await.ok()
    })
    .await;
    let messages = reading.await.expect("reading task");
    let status = client.get_ok("/api/status").await;
    let restarts: u64 = status["partitions"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["restarts"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0);
    assert!(restarts > 0, "partitions restarted: {status}");
    let mut versions: HashMap<(i64, i64), usize> = HashMap::new();
    for message in messages.iter().filter(|m| m["kind"] == "predictions") {
        let key = (message["data"]["id"].as_i64().expect("id"), message["data"]["revision"].as_i64().expect("rev"));
        *versions.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = versions.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        twice.is_empty(),
        "{} versions sent more than once after {restarts} restarts: {:?}",
        twice.len(),
        twice.first()
    );
    let stored = common::all_predictions(&client).await;
    for row in &stored {
        let key = (row["id"].as_i64().expect("id"), row["revision"].as_i64().expect("rev"));
        assert!(versions.contains_key(&key), "stored version {key:?} never sent");
    }
    runtime.shutdown().await;
}

/// Every alert in the store (`GET /api/alerts`), by id.
async fn stored_alerts(client: &Client) -> BTreeMap<i64, Value> {
    let page = client.get_ok("/api/alerts?limit=1000").await;
    assert!(page["nextCursor"].is_null(), "more than 1,000 alerts");
    page["items"].as_array().into_iter().flatten().map(|a| (a["id"].as_i64().unwrap_or(-1), a.clone())).collect()
}

/// The last `alerts` message of each alert (a firing one is followed by its resolution),
/// by id.
fn last_alert_messages(messages: &[Value]) -> BTreeMap<i64, Value> {
    messages
        .iter()
        .filter(|m| m["kind"] == "alerts")
        .map(|m| (m["data"]["id"].as_i64().unwrap_or(-1), m["data"].clone()))
        .collect()
}
