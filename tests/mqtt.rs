//! MQTT ingestion against a real Mosquitto broker: `scripts/test.sh` installs Mosquitto
//! and starts one on 127.0.0.1:51883 (`TIDEMARK_TEST_MQTT_URL`); the tests that restart
//! a broker, or need TLS and passwords, start their own `mosquitto` process on a free
//! loopback port. In every case the result table must equal an HTTP ingestion of the
//! same events.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Process, eventually};
use serde_json::Value;
use tidemark::config::{Config, ConfigSources, MqttConfig};
use tidemark::sim::mqtt::{Publisher, topic_for};
use tidemark::sim::{Generator, SimConfig, SimEvent};

/// The broker `scripts/test.sh` starts.
fn shared_broker() -> String {
    common::mqtt_url()
}

fn mosquitto_binary() -> PathBuf {
    for candidate in ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A Mosquitto process of the test's own, with persistence (so a restart keeps the
/// sessions and their queued messages) and queues large enough for a backlog.
struct PrivateBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = format!(
            // `user root`: run as root (a CI container), Mosquitto would otherwise switch
            // to its own user, which cannot write the persistence file in this directory.
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nmax_queued_messages 1000000\n\
             max_inflight_messages 0\nuser root\nlog_dest file {}/mosquitto.log\n{extra}",
            dir.path().display(),
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut broker = Self { dir, port, child: None };
        broker.resume();
        broker
    }

    fn resume(&mut self) {
        let child = std::process::Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "mosquitto did not listen on {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the broker as an operator does (SIGTERM: it saves its sessions).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn url(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://{host}:{}", self.port)
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A unique topic prefix and session name per test run (the shared broker serves all).
fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), rand::random::<u32>())
}

/// The simulated stream: `sensors` sensors × 4 event types, about `events` events.
fn stream(sensors: u32, events: u64, seed: u64) -> Vec<SimEvent> {
    let rate = 200.0;
    let seconds = events as f64 / rate;
    Generator::new(SimConfig {
        sensors,
        rate,
        duration: Some(Duration::from_secs_f64(seconds)),
        seed,
        ..SimConfig::default()
    })
    .collect()
}

fn json_line(event: &SimEvent) -> String {
    let mut line = String::new();
    event.write_json(&mut line);
    line.trim_end().to_string()
}

fn publisher_config(url: &str) -> MqttConfig {
    Config::load(&ConfigSources::default().with("mqtt.url", url)).expect("default config").mqtt
}

/// Publish `events` from `publishers` clients (a sensor always on the same one), calling
/// `midway` once after half of them; returns how many the broker acknowledged.
async fn publish<F: FnOnce()>(
    config: &MqttConfig,
    prefix: &str,
    events: &[SimEvent],
    publishers: usize,
    midway: F,
) -> u64 {
    let mut clients: Vec<Publisher> =
        (0..publishers).map(|i| Publisher::connect(config, &format!("{prefix}-pub-{i}")).expect("publisher")).collect();
    let mut midway = Some(midway);
    for (index, event) in events.iter().enumerate() {
        if index == events.len() / 2
            && let Some(midway) = midway.take()
        {
            midway();
        }
        let client = tidemark::routing::partition_for(&event.sensor_id, publishers as u32) as usize;
        let topic = topic_for(&format!("{prefix}/{{sensorId}}/data"), &event.sensor_id, event.event_type);
        clients[client].send(topic, json_line(event).into_bytes()).await.expect("publish");
    }
    let mut acknowledged = 0;
    for client in clients {
        acknowledged += client.finish(Duration::from_secs(120)).await.expect("the broker acknowledges");
    }
    acknowledged
}

/// Events that close every window of the stream: one per key, an hour after its end.
fn closers(events: &[SimEvent]) -> Vec<SimEvent> {
    let mut keys: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    for event in events {
        let entry = keys.entry((event.sensor_id.to_string(), event.event_type)).or_insert(i64::MIN);
        *entry = (*entry).max(event.timestamp_ms);
    }
    keys.into_iter()
        .map(|((sensor, event_type), last)| SimEvent {
            sensor_id: sensor.into(),
            event_type,
            value: 1.0,
            timestamp_ms: last + 3_600_000,
            emit_ms: 0,
        })
        .collect()
}

/// Fields compared between runs: counts and extremes exactly, sums and scores to 1e-9
/// (the order of additions may differ between ingestion paths).
fn table(rows: &[Value]) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|row| {
            let key = format!("{}|{}|{}", row["sensorId"], row["eventType"], row["windowStart"]);
            (key, row.clone())
        })
        .collect()
}

fn assert_same_table(reference: &[Value], actual: &[Value], what: &str) {
    let (expected, got) = (table(reference), table(actual));
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} windows expected, {} found; missing e.g. {missing:?}, unexpected e.g. {extra:?}",
        expected.len(),
        got.len()
    );
    for (key, want) in &expected {
        let have = &got[key];
        for field in ["eventCount", "minValue", "maxValue", "revision", "windowEnd"] {
            assert_eq!(want[field], have[field], "{what}: window {key} differs in {field}");
        }
        for field in ["avgValue", "stddev", "predictionScore"] {
            let (a, b) = (want[field].as_f64().unwrap_or(f64::NAN), have[field].as_f64().unwrap_or(f64::NAN));
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(1.0) || (a.is_nan() && b.is_nan()),
                "{what}: window {key} differs in {field}: {a} vs {b}"
            );
        }
    }
}

/// The table an HTTP ingestion of `events` (then `closers`) produces.
async fn http_reference(events: &[SimEvent], closing: &[SimEvent]) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(common::sources(dir.path())).await;
    let client = Client::new(&runtime);
    let lines: Vec<String> = events.iter().chain(closing).map(json_line).collect();
    let accepted = common::post_batches(&client, &lines, 2000, Duration::from_millis(100)).await;
    assert_eq!(accepted as usize, lines.len(), "the reference run takes every event");
    runtime.flush_sinks(Duration::from_secs(30)).await.expect("flush");
    eventually(Duration::from_secs(60), "the reference run to process every event", || async {
        let partitions = client.get_ok("/api/status").await["partitions"].as_array().cloned().unwrap_or_default();
        partitions.iter().all(|p| p["processedPosition"] == p["nextPosition"]).then_some(())
    })
    .await;
    let rows = settled_table(&client, 0).await;
    runtime.shutdown().await;
    rows
}

/// Poll the predictions until the table stops changing (and has at least `min` rows).
async fn settled_table(client: &Client, min: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last: Vec<String> = Vec::new();
    let mut stable = 0;
    loop {
        let rows = common::all_predictions(client).await;
        let comparable = common::comparable(&rows);
        if rows.len() >= min && !rows.is_empty() && comparable == last {
            stable += 1;
            if stable >= 3 {
                return rows;
            }
        } else {
            stable = 0;
        }
        assert!(tokio::time::Instant::now() < deadline, "the results did not settle within 120 s");
        last = comparable;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn metrics_text(client: &Client) -> String {
    reqwest::get(format!("{}/metrics", client.base)).await.expect("metrics").text().await.expect("text")
}

fn mqtt_sources(dir: &Path, url: &str, prefix: &str) -> ConfigSources {
    common::sources(dir)
        .with("mqtt.enabled", true)
        .with("mqtt.url", url)
        .with("mqtt.client_id", format!("{prefix}-tidemark"))
        .with("mqtt.topics", vec![format!("{prefix}/{{sensorId}}/data")])
        .with("mqtt.reconnect_backoff_max", "500ms")
}

async fn mqtt_status(client: &Client) -> Value {
    client.get_ok("/api/status").await["mqtt"].clone()
}

/// Wait (10 s at most) until `/api/status` → `mqtt.<flag>` is true (`connected`, `subscribed`).
/// SIGKILL a process that took `events` without acknowledging them (its last setting
/// is `chaos.mqtt_withhold_acks`), start it again without that setting, and wait until
/// the broker's redelivery of every one is recognised.
#[cfg(feature = "chaos")]
async fn kill_and_restart_with_acks(
    mut process: Process,
    env: &mut Vec<(&'static str, String)>,
    events: usize,
) -> (Process, Client, Value) {
    process.signal("KILL");
    let _ = process.wait(Duration::from_secs(10));
    env.pop();
    let process = Process::start(env);
    let client = process.client();
    let status = eventually(Duration::from_secs(60), "every redelivery recognised", || async {
        let status = mqtt_status(&client).await;
        (status["duplicates"].as_u64() == Some(events as u64)).then_some(status)
    })
    .await;
    (process, client, status)
}

async fn wait_for_flag(client: &Client, flag: &str) {
    eventually(Duration::from_secs(10), &format!("mqtt.{flag}"), || async {
        mqtt_status(client).await[flag].as_bool().filter(|set| *set)
    })
    .await;
}

/// The settings of a `tidemark run` process subscribed to `{prefix}/{sensorId}/data`.
fn process_env(dir: &Path, url: &str, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.join("tidemark.db").display())),
        ("TIDEMARK__MQTT__ENABLED", "true".into()),
        ("TIDEMARK__MQTT__URL", url.to_string()),
        ("TIDEMARK__MQTT__CLIENT_ID", format!("{prefix}-tidemark")),
        ("TIDEMARK__MQTT__TOPICS", format!("[\"{prefix}/{{sensorId}}/data\"]")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_from_several_publishers_equals_http_ingestion_and_bad_payloads_are_dead_lettered() {
    let url = shared_broker();
    let prefix = unique("several");
    let events = stream(40, 52_000, 7);
    assert!(events.len() >= 50_000, "the stream has {} events", events.len());
    let closing = closers(&events);

    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(mqtt_sources(dir.path(), &url, &prefix)).await;
    let client = Client::new(&runtime);
    wait_for_flag(&client, "connected").await;
    let publishers = publisher_config(&url);
    let published = publish(&publishers, &prefix, &events, 4, || {}).await;
    assert_eq!(published as usize, events.len());
    // Bad payloads in the middle of the subscription: dead-lettered with the topic, and
    // the stream goes on.
    let mut bad = Publisher::connect(&publishers, &format!("{prefix}-bad")).expect("publisher");
    bad.send(format!("{prefix}/s-bad/data"), b"{\"eventType\":\"t\",\"value\":\"warm\"}".to_vec())
        .await
        .expect("publish");
    bad.send(format!("{prefix}/s-bad/data"), b"not json".to_vec()).await.expect("publish");
    bad.finish(Duration::from_secs(10)).await.expect("acknowledged");
    let published = publish(&publishers, &prefix, &closing, 1, || {}).await;
    assert_eq!(published as usize, closing.len());

    let total = (events.len() + closing.len()) as u64;
    let status = eventually(Duration::from_secs(120), "every MQTT message to be taken", || async {
        let status = mqtt_status(&client).await;
        // Taken and acknowledged (inFlight 0).
        (status["accepted"].as_u64() == Some(total)
            && status["rejected"].as_u64() == Some(2)
            && status["inFlight"] == 0)
            .then_some(status)
    })
    .await;
    assert_eq!(status["duplicates"], 0, "no redelivery without a failure: {status}");

    let letters = client.get_ok("/api/dead-letters").await;
    let items: Vec<Value> = letters["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["source"] == "mqtt")
        .collect();
    assert_eq!(items.len(), 2, "{letters}");
    for item in &items {
        assert_eq!(item["source"], "mqtt");
        assert!(item["error"].as_str().unwrap_or("").contains(&format!("{prefix}/s-bad/data")), "{item}");
        assert_eq!(item["sensorId"], "s-bad");
    }
    assert!(items.iter().any(|i| i["reason"] == "wrong_type" && i["error"].as_str().unwrap_or("").contains("value")));
    assert!(items.iter().any(|i| i["reason"] == "unparsable" && i["payload"] == "not json"));

    let metrics = metrics_text(&client).await;
    assert!(metrics.contains("tidemark_mqtt_connected 1"), "{metrics}");
    assert!(metrics.contains(r#"tidemark_events_rejected_total{source="mqtt",reason="unparsable"} 1"#), "{metrics}");
    let mqtt_rows = settled_table(&client, 0).await;
    runtime.shutdown().await;
    let reference = http_reference(&events, &closing).await;
    assert_same_table(&reference, &mqtt_rows, "MQTT from 4 publishers vs HTTP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_and_doubles_nothing() {
    let mut broker = PrivateBroker::start("allow_anonymous true\n");
    let url = broker.url("mqtt", "127.0.0.1");
    let prefix = unique("restart");
    let events = stream(40, 52_000, 11);
    assert!(events.len() >= 50_000, "the stream has {} events", events.len());
    let closing = closers(&events);

    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(mqtt_sources(dir.path(), &url, &prefix)).await;
    let client = Client::new(&runtime);
    wait_for_flag(&client, "connected").await;
    let publishers = publisher_config(&url);
    let broker_ref = &mut broker;
    let published = publish(&publishers, &prefix, &events, 4, || {
        broker_ref.stop();
        std::thread::sleep(Duration::from_millis(500));
        broker_ref.resume();
    })
    .await;
    assert_eq!(published as usize, events.len());
    publish(&publishers, &prefix, &closing, 1, || {}).await;

    let status = eventually(Duration::from_secs(120), "tidemark to reconnect and take the rest", || async {
        let status = mqtt_status(&client).await;
        let taken = status["accepted"].as_u64().unwrap_or(0) + status["duplicates"].as_u64().unwrap_or(0);
        (status["reconnects"].as_u64() >= Some(1)
            && taken >= (events.len() + closing.len()) as u64
            && status["inFlight"] == 0)
            .then_some(status)
    })
    .await;
    eprintln!("after the broker restart: {status}");
    let rows = settled_table(&client, 0).await;
    runtime.shutdown().await;
    let reference = http_reference(&events, &closing).await;
    assert_same_table(&reference, &rows, "MQTT through a broker restart vs HTTP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_and_sigkill_mid_stream_then_the_same_session_resumes_exactly_once() {
    let broker = PrivateBroker::start("allow_anonymous true\n");
    let url = broker.url("mqtt", "127.0.0.1");
    let prefix = unique("kill");
    let events = stream(40, 60_000, 13);
    assert!(events.len() >= 50_000, "the stream has {} events", events.len());
    let closing = closers(&events);
    let dir = tempfile::tempdir().expect("temp dir");
    let env: Vec<(&str, String)> = process_env(dir.path(), &url, &prefix);
    let process = Arc::new(parking_lot::Mutex::new(Process::start(&env)));
    let publishers = publisher_config(&url);

    // The publishers run on; tidemark is stopped twice under them.
    let publishing = {
        let publishers = publishers.clone();
        let prefix = prefix.clone();
        let events = events.clone();
        tokio::spawn(async move {
            // Paced in slices, so the stops fall mid-stream.
            let mut acknowledged = 0;
            for slice in events.chunks(5_000) {
                acknowledged += publish(&publishers, &prefix, slice, 4, || {}).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            acknowledged
        })
    };
    let taken = |process: &Arc<parking_lot::Mutex<Process>>| {
        let client = process.lock().client();
        async move { mqtt_status(&client).await["accepted"].as_u64().unwrap_or(0) }
    };
    eventually(Duration::from_secs(60), "tidemark to take 10,000 events", || async {
        (taken(&process).await >= 10_000).then_some(())
    })
    .await;
    {
        let mut running = process.lock();
        running.signal("TERM");
        let status = running.wait(Duration::from_secs(30));
        assert!(status.success(), "SIGTERM: graceful exit expected, got {status}; log:\n{}", running.log());
        assert!(running.log().contains("tidemark stopped"));
    }
    *process.lock() = Process::start(&env);
    eventually(Duration::from_secs(60), "the restarted tidemark to take 10,000 events", || async {
        (taken(&process).await >= 10_000).then_some(())
    })
    .await;
    process.lock().signal("KILL");
    let _ = process.lock().wait(Duration::from_secs(10));
    *process.lock() = Process::start(&env);

    let published = publishing.await.expect("publishers");
    assert_eq!(published as usize, events.len());
    publish(&publishers, &prefix, &closing, 1, || {}).await;
    let client = process.lock().client();
    let status = eventually(Duration::from_secs(120), "the last run to drain the session", || async {
        let status = mqtt_status(&client).await;
        let session_present = process.lock().log().contains("\"session_present\":true");
        (status["inFlight"] == 0 && session_present && status["accepted"].as_u64().unwrap_or(0) > 0).then_some(status)
    })
    .await;
    eprintln!("last run: {status}");
    let rows = settled_table(&client, closing.len()).await;
    let reference = http_reference(&events, &closing).await;
    assert_same_table(&reference, &rows, "MQTT through SIGTERM and SIGKILL vs HTTP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_client_certificate_and_a_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tidemark test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("tidemark");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let ca_file = write("ca.pem", &ca.pem());
    let server_cert = write("server.pem", &server_cert);
    let server_key = write("server.key", &server_key);
    let client_cert = write("client.pem", &client_cert);
    let client_key = write("client.key", &client_key);
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .arg("device")
        .arg("s3cret-pass")
        .status()
        .expect("mosquitto_passwd runs (apt-get install mosquitto)");
    assert!(made.success());
    let broker = PrivateBroker::start(&format!(
        "allow_anonymous false\npassword_file {}\ncafile {ca_file}\ncertfile {server_cert}\nkeyfile {server_key}\n\
         require_certificate true\n",
        passwords.display()
    ));
    let url = broker.url("mqtts", "localhost");
    let prefix = unique("tls");
    let secure = |sources: ConfigSources, password: &str| {
        sources
            .with("mqtt.username", "device")
            .with("mqtt.password", password)
            .with("mqtt.ca_file", ca_file.clone())
            .with("mqtt.client_cert_file", client_cert.clone())
            .with("mqtt.client_key_file", client_key.clone())
    };

    // A wrong password: not connected, /ready says why, HTTP ingestion goes on.
    let store = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(secure(mqtt_sources(store.path(), &url, &prefix), "wrong")).await;
    let client = Client::new(&runtime);
    let (code, ready) = eventually(Duration::from_secs(10), "/ready to report the MQTT connection", || async {
        let (code, body) = client.get("/ready").await;
        (code == 503 && body.to_string().contains("mqtt: not connected")).then_some((code, body))
    })
    .await;
    assert_eq!(code, 503, "{ready}");
    let (code, _) = client.post_json(&serde_json::json!({"sensorId": "h1", "eventType": "t", "value": 1.0})).await;
    assert_eq!(code, 202, "HTTP ingestion keeps working while MQTT is down");
    runtime.shutdown().await;

    // The right one: connected over TLS with the client certificate.
    let store = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(secure(mqtt_sources(store.path(), &url, &prefix), "s3cret-pass")).await;
    let client = Client::new(&runtime);
    wait_for_flag(&client, "connected").await;
    let (code, _) = client.get("/ready").await;
    assert_eq!(code, 200);
    let status = client.get_ok("/api/status").await;
    assert!(!status.to_string().contains("s3cret-pass"), "the password never shows: {status}");

    let config = Config::load(&secure(ConfigSources::default().with("mqtt.url", url.clone()), "s3cret-pass"))
        .expect("config")
        .mqtt;
    let events = stream(4, 400, 3);
    let published = publish(&config, &prefix, &events, 2, || {}).await;
    assert_eq!(published as usize, events.len());
    eventually(Duration::from_secs(30), "the events over TLS", || async {
        (mqtt_status(&client).await["accepted"].as_u64() == Some(events.len() as u64)).then_some(())
    })
    .await;
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_down_at_start_is_reported_and_joined_when_it_comes() {
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let prefix = unique("late-broker");
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(mqtt_sources(dir.path(), &url, &prefix)).await;
    let client = Client::new(&runtime);
    eventually(Duration::from_secs(10), "/ready to name the MQTT connection", || async {
        let (code, body) = client.get("/ready").await;
        (code == 503 && body.to_string().contains("mqtt: not connected")).then_some(())
    })
    .await;
    let (code, _) = client.post_json(&serde_json::json!({"sensorId": "h1", "eventType": "t", "value": 1.0})).await;
    assert_eq!(code, 202, "HTTP ingestion works without the broker");
    let metrics = metrics_text(&client).await;
    assert!(metrics.contains("tidemark_mqtt_connected 0"), "{metrics}");

    // The broker comes up on that port.
    let conf = tempfile::tempdir().expect("temp dir");
    std::fs::write(conf.path().join("m.conf"), format!("listener {port} 127.0.0.1\nallow_anonymous true\n"))
        .expect("conf");
    let mut child = std::process::Command::new(mosquitto_binary())
        .arg("-c")
        .arg(conf.path().join("m.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto");
    eventually(Duration::from_secs(15), "ready once the broker is up", || async {
        (client.get("/ready").await.0 == 200).then_some(())
    })
    .await;
    let publishers = publisher_config(&url);
    let events = stream(2, 100, 5);
    publish(&publishers, &prefix, &events, 1, || {}).await;
    eventually(Duration::from_secs(20), "the events", || async {
        (mqtt_status(&client).await["accepted"].as_u64() == Some(events.len() as u64)).then_some(())
    })
    .await;
    let status = mqtt_status(&client).await;
    assert_eq!(status["connected"], true);
    runtime.shutdown().await;
    let _ = child.kill();
    let _ = child.wait();
}

/// Every message the killed run took but did not acknowledge comes again: the next run
/// must recognise all of them (from the ingest log's tail) and count none twice.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redeliveries_after_a_sigkill_are_recognised_from_the_ingest_log() {
    let broker = PrivateBroker::start("allow_anonymous true\n");
    let url = broker.url("mqtt", "127.0.0.1");
    let prefix = unique("redeliver");
    let events = stream(20, 10_000, 17);
    let closing = closers(&events);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env: Vec<(&str, String)> = process_env(dir.path(), &url, &prefix);
    env.push(("TIDEMARK__CHAOS__MQTT_WITHHOLD_ACKS", "true".into()));
    let process = Process::start(&env);
    let publishers = publisher_config(&url);
    let client = process.client();
    wait_for_flag(&client, "connected").await;
    publish(&publishers, &prefix, &events, 2, || {}).await;
    // Taken (and, with the chaos setting, dropped instead of acknowledged).
    eventually(Duration::from_secs(60), "every event taken and none acknowledged", || async {
        let status = mqtt_status(&client).await;
        (status["accepted"].as_u64() == Some(events.len() as u64) && status["inFlight"] == 0).then_some(status)
    })
    .await;
    let (_process, client, status) = kill_and_restart_with_acks(process, &mut env, events.len()).await;
    assert_eq!(status["accepted"], 0, "a redelivery was counted again: {status}");
    publish(&publishers, &prefix, &closing, 1, || {}).await;
    let rows = settled_table(&client, closing.len()).await;
    let reference = http_reference(&events, &closing).await;
    assert_same_table(&reference, &rows, "MQTT redelivered after SIGKILL vs HTTP");
}

/// `mqtt.forward = "kafka"`: a message is acknowledged once Kafka has its event on
/// `kafka.topic`; this instance also consumes the topic, and the table equals HTTP's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridged_to_kafka_the_results_equal_http_ingestion() {
    let topics = [("sensor-events".to_string(), 4), ("sensor-events.dlq".to_string(), 1)];
    let kafka = tidemark::sim::kafka::MockBroker::start(1, &topics, Duration::ZERO).expect("mock Kafka cluster");
    let brokers = kafka.bootstrap_servers().expect("bootstrap servers");
    let url = shared_broker();
    let prefix = unique("bridge");
    let events = stream(20, 8_000, 19);
    let closing = closers(&events);
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(
        mqtt_sources(dir.path(), &url, &prefix)
            .with("mqtt.forward", "kafka")
            .with("ingest.mode", "kafka")
            .with("kafka.enabled", true)
            .with("kafka.brokers", brokers.as_str()),
    )
    .await;
    let client = Client::new(&runtime);
    eventually(Duration::from_secs(20), "the MQTT connection", || async {
        mqtt_status(&client).await["connected"].as_bool().filter(|c| *c)
    })
    .await;
    let publishers = publisher_config(&url);
    publish(&publishers, &prefix, &events, 2, || {}).await;
    publish(&publishers, &prefix, &closing, 1, || {}).await;
    let total = (events.len() + closing.len()) as u64;
    eventually(Duration::from_secs(60), "every message on the topic", || async {
        (mqtt_status(&client).await["accepted"].as_u64() == Some(total)).then_some(())
    })
    .await;
    let rows = settled_table(&client, closing.len()).await;
    let metrics = metrics_text(&client).await;
    assert!(metrics.contains(&format!("tidemark_events_accepted_total{{source=\"mqtt\"}} {total}")), "{metrics}");
    runtime.shutdown().await;
    let reference = http_reference(&events, &closing).await;
    assert_same_table(&reference, &rows, "MQTT bridged through Kafka vs HTTP");
}

/// When is a message safe? With the fsynced ingest log: once logged, even while the store
/// takes nothing. With `ingest.durability = "memory"`: only once a checkpoint covering
/// it is committed — so while every store write fails, nothing is acknowledged.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledgements_wait_for_durability_log_or_checkpoint() {
    let url = shared_broker();
    for (durability, failure_rate, acknowledged) in
        [("fsync", 1.0, true), ("memory", 1.0, false), ("memory", 0.0, true)]
    {
        let prefix = unique(&format!("ack-{durability}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = common::start(
            mqtt_sources(dir.path(), &url, &prefix)
                .with("ingest.durability", durability)
                .with("chaos.store_batch_failure_rate", failure_rate),
        )
        .await;
        let client = Client::new(&runtime);
        wait_for_flag(&client, "connected").await;
        let events = stream(4, 200, 23);
        publish(&publisher_config(&url), &prefix, &events, 1, || {}).await;
        let status = eventually(Duration::from_secs(20), "the events taken", || async {
            let status = mqtt_status(&client).await;
            (status["accepted"].as_u64() == Some(events.len() as u64)
                || (status["messages"].as_u64() == Some(events.len() as u64) && !acknowledged))
                .then_some(status)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = if acknowledged { mqtt_status(&client).await } else { status };
        let in_flight = mqtt_status(&client).await["inFlight"].as_u64().unwrap_or(0);
        if acknowledged {
            assert_eq!(in_flight, 0, "{durability} (store failing: {failure_rate}): all acknowledged: {status}");
        } else {
            assert_eq!(
                in_flight,
                events.len() as u64,
                "{durability}: nothing is acknowledged before a checkpoint commits: {status}"
            );
        }
        drop(runtime);
    }
}

/// A backlog queued in tidemark's session while it was away — far more than
/// `receive_maximum` — drains completely once it is back (the broker may send more
/// than the Receive Maximum; acknowledging must never wait for the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_queued_while_tidemark_was_away_drains_completely() {
    let broker = PrivateBroker::start("allow_anonymous true\n");
    let url = broker.url("mqtt", "127.0.0.1");
    let prefix = unique("backlog");
    let events = stream(100, 80_000, 29);
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = common::start(mqtt_sources(dir.path(), &url, &prefix)).await;
    let client = Client::new(&runtime);
    wait_for_flag(&client, "subscribed").await;
    runtime.shutdown().await;

    let published = publish(&publisher_config(&url), &prefix, &events, 4, || {}).await;
    assert_eq!(published as usize, events.len());
    let runtime = common::start(mqtt_sources(dir.path(), &url, &prefix)).await;
    let client = Client::new(&runtime);
    let status = eventually(Duration::from_secs(90), "the backlog to drain", || async {
        let status = mqtt_status(&client).await;
        (status["accepted"].as_u64() == Some(events.len() as u64) && status["inFlight"] == 0).then_some(status)
    })
    .await;
    assert_eq!(status["duplicates"], 0, "{status}");
    runtime.shutdown().await;
}

/// A bridge (`mqtt.forward = "kafka"`) killed with every message unacknowledged: the
/// next run recognises all of them against the topic's newest messages, so the topic
/// holds each event once.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_bridge_publishes_nothing_twice() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topics = [("sensor-events".to_string(), 4)];
    let kafka = tidemark::sim::kafka::MockBroker::start(1, &topics, Duration::ZERO).expect("mock Kafka cluster");
    let brokers = kafka.bootstrap_servers().expect("bootstrap servers");
    let broker = PrivateBroker::start("allow_anonymous true\n");
    let url = broker.url("mqtt", "127.0.0.1");
    let prefix = unique("bridge-kill");
    let events = stream(10, 4_000, 31);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env: Vec<(&str, String)> = process_env(dir.path(), &url, &prefix);
    env.push(("TIDEMARK__MQTT__FORWARD", "kafka".into()));
    env.push(("TIDEMARK__KAFKA__BROKERS", brokers.clone()));
    env.push(("TIDEMARK__CHAOS__MQTT_WITHHOLD_ACKS", "true".into()));
    let process = Process::start(&env);
    let client = process.client();
    wait_for_flag(&client, "subscribed").await;
    publish(&publisher_config(&url), &prefix, &events, 2, || {}).await;
    eventually(Duration::from_secs(60), "every event on the topic, none acknowledged", || async {
        (mqtt_status(&client).await["accepted"].as_u64() == Some(events.len() as u64)).then_some(())
    })
    .await;
    let (_process, _client, status) = kill_and_restart_with_acks(process, &mut env, events.len()).await;
    assert_eq!(status["accepted"], 0, "a redelivery was published again: {status}");
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("consumer");
    let on_topic: i64 = (0..4)
        .map(|p| {
            let (low, high) =
                consumer.fetch_watermarks("sensor-events", p, Duration::from_secs(5)).expect("watermarks");
            high - low
        })
        .sum();
    assert_eq!(on_topic as usize, events.len(), "the topic holds every event once");
}
