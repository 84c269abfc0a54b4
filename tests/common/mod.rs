//! Helpers shared by the integration tests: an instance on a free loopback port with a
//! fresh SQLite store, and a small HTTP client.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tidemark::config::{Config, ConfigSources};
use tidemark::runtime::Runtime;

/// Settings for tests: loopback port 0, the store in `dir`, fast checkpoints.
pub fn sources(dir: &Path) -> ConfigSources {
    let url = format!("sqlite://{}", dir.join("tidemark.db").display());
    ConfigSources::default()
        .with("http.listen", "127.0.0.1:0")
        .with("store.url", url)
        .with("ingest.log_dir", dir.join("ingest-log").display().to_string())
        .with("store.linger", "20ms")
        .with("checkpoint.interval", "200ms")
        .with("supervision.backoff_initial", "20ms")
        .with("supervision.backoff_max", "200ms")
        .with("log.level", "warn")
}

pub fn config(sources: ConfigSources) -> Config {
    match Config::load(&sources) {
        Ok(config) => config,
        Err(errors) => panic!("test configuration is invalid: {errors}"),
    }
}

pub async fn start(sources: ConfigSources) -> Runtime {
    match Runtime::start(config(sources)).await {
        Ok(runtime) => runtime,
        Err(error) => panic!("runtime did not start: {error:#}"),
    }
}

pub struct Client {
    pub base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(runtime: &Runtime) -> Self {
        Self { base: format!("http://{}", runtime.addr()), http: reqwest::Client::new() }
    }

    pub async fn post(&self, path: &str, content_type: &str, body: impl Into<String>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body.into())
            .send()
            .await
            .expect("request reaches the server");
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn post_json(&self, body: &Value) -> (u16, Value) {
        self.post("/api/events", "application/json", body.to_string()).await
    }

    /// POST events; `None` when the connection failed or broke before a full answer
    /// (the server was killed).
    pub async fn try_post_json(&self, body: &Value) -> Option<u16> {
        let response = self
            .http
            .post(format!("{}/api/events", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        response.bytes().await.ok()?;
        Some(status)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(format!("{}{path}", self.base)).send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// GET and expect 200.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

/// Poll `check` until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's resident memory, in bytes.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Every prediction row, oldest window first, as comparable tuples.
pub async fn all_predictions(client: &Client) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/predictions?limit=1000&cursor={cursor}"),
            None => "/api/predictions?limit=1000".to_string(),
        };
        let page = client.get_ok(&path).await;
        rows.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    rows.reverse();
    rows
}

/// Post NDJSON `lines` in batches, retrying a batch the server refuses with 503 (after
/// its `Retry-After`, capped at `max_wait`). Returns the number of events accepted.
pub async fn post_batches(client: &Client, lines: &[String], batch: usize, max_wait: Duration) -> u64 {
    post_batches_counting(client, lines, batch, max_wait).await.0
}

/// [`post_batches`], also returning how many times the server answered 503.
pub async fn post_batches_counting(client: &Client, lines: &[String], batch: usize, max_wait: Duration) -> (u64, u64) {
    let mut accepted = 0;
    let mut refused = 0;
    for chunk in lines.chunks(batch) {
        let body = chunk.join("\n");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, answer) = client.post("/api/events", "application/x-ndjson", body.clone()).await;
            if status == 202 {
                accepted += answer["accepted"].as_u64().unwrap_or(0);
                break;
            }
            assert_eq!(status, 503, "unexpected answer: {answer}");
            refused += 1;
            assert!(tokio::time::Instant::now() < deadline, "still refused after 60 s: {answer}");
            tokio::time::sleep(max_wait).await;
        }
    }
    (accepted, refused)
}

/// The simulator's events as NDJSON lines.
pub fn workload(config: tidemark::sim::SimConfig) -> Vec<String> {
    tidemark::sim::Generator::new(config)
        .map(|event| {
            let mut line = String::new();
            event.write_json(&mut line);
            line.trim_end().to_string()
        })
        .collect()
}

/// Window results on the fields that must not change with faults or restarts.
pub fn comparable(rows: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = rows
        .iter()
        .map(|row| {
            serde_json::json!([
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
            .to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// A `tidemark` process started from the built binary, for tests where a restart or a
/// signal must be real.
pub struct Process {
    pub child: std::process::Child,
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// `tidemark run` with `TIDEMARK__…` settings in `env`; waits until it serves.
    pub fn start(env: &[(&str, String)]) -> Self {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"));
        command
            .arg("run")
            .env("TIDEMARK__HTTP__LISTEN", "127.0.0.1:0")
            .env("TIDEMARK__LOG__FORMAT", "json")
            .env("TIDEMARK__LOG__LEVEL", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        // One ingest log per store (a restart with the same store finds its log).
        if !env.iter().any(|(key, _)| *key == "TIDEMARK__INGEST__LOG_DIR")
            && let Some((_, url)) = env.iter().find(|(key, _)| *key == "TIDEMARK__STORE__URL")
            && url.starts_with("postgres")
        {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            url.hash(&mut hasher);
            let dir = std::env::temp_dir().join(format!("tidemark-test-log-{:016x}", hasher.finish()));
            command.env("TIDEMARK__INGEST__LOG_DIR", dir);
        }
        let mut child = command.spawn().expect("tidemark binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tidemark is running")
                    && let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && let Some(addr) = entry["fields"]["addr"].as_str()
                {
                    let _ = addr_tx.send(addr.to_string());
                }
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                panic!("tidemark did not start within 30 s; its log:\n{log}");
            }
        };
        Self { child, addr, log }
    }

    pub fn client(&self) -> Client {
        Client { base: format!("http://{}", self.addr), http: reqwest::Client::new() }
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tidemark did not exit within {timeout:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store backends the API suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `sources(dir)` with the store on `backend`: SQLite in `dir`, or a fresh database on
/// the PostgreSQL server at `TIDEMARK_TEST_DATABASE_URL`.
pub async fn sources_on(backend: Backend, dir: &Path) -> ConfigSources {
    match backend {
        Backend::Sqlite => sources(dir),
        Backend::Postgres => sources(dir).with("store.url", fresh_postgres_database().await),
    }
}

/// The Mosquitto broker the test script starts (`TIDEMARK_TEST_MQTT_URL`).
pub fn mqtt_url() -> String {
    std::env::var("TIDEMARK_TEST_MQTT_URL").unwrap_or_else(|_| {
        panic!(
            "TIDEMARK_TEST_MQTT_URL is not set: run the tests with scripts/test.sh, which starts Mosquitto on \
             127.0.0.1:51883, or start one yourself (mosquitto -p 51883) and set TIDEMARK_TEST_MQTT_URL=mqtt://127.0.0.1:51883"
        )
    })
}

/// Create an empty database on the test server and return its URL.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let Ok(server) = std::env::var("TIDEMARK_TEST_DATABASE_URL") else {
        panic!(
            "TIDEMARK_TEST_DATABASE_URL is not set: the PostgreSQL tests need a server. \
             Run scripts/test.sh (it starts one on 127.0.0.1:55432), or start PostgreSQL and set \
             TIDEMARK_TEST_DATABASE_URL=postgres://USER@HOST:PORT/postgres"
        );
    };
    let mut admin = match sqlx::PgConnection::connect(&server).await {
        Ok(connection) => connection,
        Err(error) => panic!(
            "cannot reach PostgreSQL at TIDEMARK_TEST_DATABASE_URL ({server}): {error}. \
             Start it (scripts/test.sh does) or point the variable at a running server"
        ),
    };
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "tidemark_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        rand::random::<u32>()
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("CREATE DATABASE");
    let _ = admin.close().await;
    // Replace the database path of the server URL.
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base.to_string(), format!("?{query}")),
        None => (server.clone(), String::new()),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base.as_str(),
    };
    format!("{root}/{name}{query}")
}

/// `backend_tests!(postgres, Backend::Postgres, [a, b])` defines tests `postgres::a` and
/// `postgres::b` that run `a(backend)` and `b(backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($module:ident, $backend:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($backend).await
                }
            )*
        }
    };
}

/// A PostgreSQL server of the test's own (initdb in a temp directory, on a free
/// loopback port), so the test may stop and start it.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            std::process::Command::new(&path)
        };
        command.args(args).output().unwrap_or_else(|error| panic!("cannot run {}: {error}", path.display()))
    }

    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| dirs.filter_map(Result::ok).map(|d| d.path().join("bin")).filter(|p| p.join("initdb").exists()).max())
            .unwrap_or_else(|| panic!("PostgreSQL server binaries not found under /usr/lib/postgresql: install the postgresql package (scripts/test.sh does)"));
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            let status = std::process::Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status();
            assert!(status.map(|s| s.success()).unwrap_or(false), "chown of the data directory to postgres failed");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let server = Self { dir, bin, port };
        let data = server.data();
        let output = server.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        server.resume();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Start (again) and wait until it accepts connections.
    pub fn resume(&self) {
        let options =
            format!("-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log").display().to_string();
        let output = self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-o", &options, "start"]);
        assert!(output.status.success(), "pg_ctl start failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Stop it (fast shutdown: open connections are cut).
    pub fn stop(&self) {
        let output = self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
        assert!(output.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&output.stderr));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}
