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
