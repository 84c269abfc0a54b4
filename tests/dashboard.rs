//! The dashboard page in real headless Chromium (driven over WebDriver by
//! `chromedriver`, which `scripts/test.sh` installs and starts) against a running
//! `tidemark` fed by the simulator: live windows and an injected anomaly show within
//! 10 s, the page reconnects across a restart, and a screenshot goes to
//! `target/dashboard.png`.

mod common;

use std::time::{Duration, Instant};

use common::Process;
use serde_json::{Value, json};

const START_CHROMEDRIVER: &str = "set TIDEMARK_TEST_CHROMEDRIVER to a running chromedriver \
     (scripts/test.sh installs Debian's chromium and chromium-driver and starts it: \
     chromedriver --port=59515)";

struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn start(driver: &str) -> Self {
        let http = reqwest::Client::new();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-dev-shm-usage", "--window-size=1680,1050"],
            },
        }}});
        let answer: Value = http
            .post(format!("{driver}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap_or_else(|error| panic!("chromedriver at {driver} does not answer ({error}); {START_CHROMEDRIVER}"))
            .json()
            .await
            .expect("a JSON answer");
        let session =
            answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {answer}")).to_string();
        Self { http, session: format!("{driver}/session/{session}") }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.expect("chromedriver answers").json().await.expect("JSON");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_else(|| panic!("no screenshot: {png}")))
            .expect("decodes");
        std::fs::write(path, bytes).expect("screenshot written");
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// What the page shows, read from its DOM.
const PAGE_STATE: &str = "return {
    connection: document.getElementById('connection').dataset.state,
    charts: [...document.querySelectorAll('.chart')].map(c => ({key: c.dataset.key, points: +c.dataset.points,
        anomalies: +(c.dataset.anomalies || 0), last: +(c.dataset.last || 0)})),
    alerts: [...document.querySelectorAll('#alerts li')].map(li => li.dataset.sensor),
    rate: document.getElementById('t-rate').textContent,
    partitions: document.getElementById('t-partitions').textContent,
};";

async fn wait_for(browser: &Browser, within: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let state = browser.eval(PAGE_STATE).await;
        if check(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "the page did not show {what} within {within:?}: {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lines(events: &[tidemark::sim::SimEvent]) -> String {
    let mut body = String::new();
    for event in events {
        event.write_json(&mut body);
    }
    body
}

/// Post the simulator's readings as they fall due (event time = wall clock), forever.
fn feed(addr: std::sync::Arc<parking_lot::Mutex<String>>, start_ms: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut generator = tidemark::sim::Generator::new(tidemark::sim::SimConfig {
            sensors: 6,
            rate: 60.0,
            duration: None,
            seed: 11,
            start_ms,
            anomalies: 0,
            ..Default::default()
        })
        .peekable();
        loop {
            let now = chrono::Utc::now().timestamp_millis();
            let mut due = Vec::new();
            while generator.peek().is_some_and(|event| event.timestamp_ms <= now) {
                due.extend(generator.next());
            }
            if !due.is_empty() {
                let url = format!("http://{}/api/events", addr.lock());
                // A restart in progress refuses the connection: those readings are lost to
                // this feed, not to tidemark (nothing was accepted).
                let _ = http.post(url).header("content-type", "application/x-ndjson").body(lines(&due)).send().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_windows_and_alerts_and_reconnects_after_a_restart() {
    let driver = std::env::var("TIDEMARK_TEST_CHROMEDRIVER").unwrap_or_else(|_| panic!("{START_CHROMEDRIVER}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let env = [
        ("TIDEMARK__HTTP__LISTEN", format!("127.0.0.1:{port}")),
        ("TIDEMARK__STORE__URL", format!("sqlite://{}", dir.path().join("tidemark.db").display())),
        ("TIDEMARK__INGEST__LOG_DIR", dir.path().join("log").display().to_string()),
        ("TIDEMARK__PIPELINE__WINDOW", "1s".to_string()),
        ("TIDEMARK__PIPELINE__MAX_OUT_OF_ORDERNESS", "0s".to_string()),
        ("TIDEMARK__CHECKPOINT__INTERVAL", "500ms".to_string()),
    ];
    let mut tidemark = Process::start(&env);
    let client = tidemark.client();

    // Three minutes of history with injected anomalies, then readings as they happen.
    let now = chrono::Utc::now().timestamp_millis();
    let history = tidemark::sim::SimConfig {
        sensors: 6,
        rate: 60.0,
        duration: Some(Duration::from_secs(180)),
        seed: 11,
        start_ms: now - 180_000,
        anomalies: 3,
        anomalies_after: Duration::from_secs(90),
        anomaly_kinds: vec![tidemark::sim::AnomalyKind::Spike],
        ..Default::default()
    };
    let events: Vec<_> = tidemark::sim::Generator::new(history.clone()).collect();
    for chunk in events.chunks(2000) {
        let (status, answer) = client.post("/api/events", "application/x-ndjson", lines(chunk)).await;
        assert_eq!(status, 202, "{answer}");
    }
    let addr = std::sync::Arc::new(parking_lot::Mutex::new(tidemark.addr.clone()));
    let feeding = feed(std::sync::Arc::clone(&addr), now);
    let alerts = common::eventually(Duration::from_secs(30), "an alert in the store", || async {
        let alerts = client.get_ok("/api/alerts").await;
        let sensors: Vec<String> =
            alerts["items"].as_array()?.iter().filter_map(|a| a["sensorId"].as_str().map(str::to_string)).collect();
        (!sensors.is_empty()).then_some(sensors)
    })
    .await;

    let browser = Browser::start(&driver).await;
    browser.open(&format!("http://127.0.0.1:{port}/")).await;
    let opened = Instant::now();
    let shown = wait_for(&browser, Duration::from_secs(10), "live charts and the alert", |state| {
        state["connection"] == "up"
            && state["charts"].as_array().is_some_and(|c| c.iter().any(|c| c["points"].as_u64() > Some(5)))
            && state["alerts"].as_array().is_some_and(|a| a.iter().any(|s| alerts.iter().any(|x| s == x)))
            && state["partitions"] != "–"
    })
    .await;
    eprintln!("shown after {:?}: {shown}", opened.elapsed());
    // Live: windows keep arriving on the charts.
    // The newest window start on any chart (charts keep their last 180 windows).
    let points = |state: &Value| -> u64 {
        state["charts"].as_array().map_or(0, |c| c.iter().filter_map(|c| c["last"].as_u64()).max().unwrap_or(0))
    };
    let before = points(&shown);
    // Events/s needs two status messages (one per second): wait for both.
    wait_for(&browser, Duration::from_secs(10), "new live windows and events/s", |state| {
        points(state) > before && state["rate"].as_str().is_some_and(|rate| rate != "–" && rate != "0")
    })
    .await;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).expect("target dir");
    browser.screenshot(&target.join("dashboard.png")).await;

    // A restart: the page says it is reconnecting, then carries on by itself.
    tidemark.signal("TERM");
    assert!(tidemark.wait(Duration::from_secs(30)).success());
    wait_for(&browser, Duration::from_secs(10), "that it lost the connection", |state| state["connection"] == "down")
        .await;
    let mut tidemark = Process::start(&env);
    *addr.lock() = tidemark.addr.clone();
    let back =
        wait_for(&browser, Duration::from_secs(20), "the reconnected feed", |state| state["connection"] == "up").await;
    let resumed = points(&back);
    wait_for(&browser, Duration::from_secs(10), "live windows after the restart", |state| points(state) > resumed)
        .await;
    browser.screenshot(&target.join("dashboard-after-restart.png")).await;
    browser.close().await;
    feeding.abort();
    tidemark.signal("TERM");
    tidemark.wait(Duration::from_secs(30));
}
