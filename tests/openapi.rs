//! The API against its OpenAPI description (`api/openapi.json`, served at
//! `/api/openapi.json`): schemathesis generates requests from it — valid and invalid
//! parameters and bodies — against a running instance holding results, alerts and dead
//! letters, and checks every answer: no server error, status codes, content types and
//! bodies as described.

mod common;

use std::time::Duration;

use common::{Client, eventually, post_batches, start, workload};
use serde_json::Value;
use tidemark::sim::SimConfig;

/// The schemathesis command: `TIDEMARK_SCHEMATHESIS`, else `schemathesis` on the PATH.
fn schemathesis() -> String {
    std::env::var("TIDEMARK_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_conforms_to_its_openapi_description() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = start(
        common::sources(dir.path())
            .with("pipeline.window", "2s")
            .with("pipeline.idle_timeout", "1s")
            .with("scoring.warmup_windows", 3)
            .with("scoring.learning_windows", 3),
    )
    .await;
    let client = Client::new(&runtime);
    let lines = workload(SimConfig {
        sensors: 20,
        rate: 400.0,
        duration: Some(Duration::from_secs(60)),
        seed: 11,
        anomalies: 4,
        anomalies_after: Duration::from_secs(20),
        anomaly_duration: Duration::from_secs(6),
        ..SimConfig::default()
    });
    post_batches(&client, &lines, 1000, Duration::from_millis(100)).await;
    let invalid = r#"{"sensorId":"s","eventType":"t","value":"hot"}"#;
    assert_eq!(client.post("/api/events", "application/x-ndjson", invalid).await.0, 202);
    eventually(Duration::from_secs(20), "windows and alerts stored", || async {
        let alerts = client.get_ok("/api/alerts?limit=1").await;
        (alerts["count"] == 1).then_some(())
    })
    .await;

    // The served document is the repository's, and every path in it is routed.
    let served = client.get_ok("/api/openapi.json").await;
    let file: Value = serde_json::from_str(include_str!("../api/openapi.json")).expect("api/openapi.json is JSON");
    assert_eq!(served, file);
    for path in file["paths"].as_object().expect("paths").keys() {
        let (status, body) = client.get(path).await;
        assert_ne!(status, 404, "{path} is described but not routed: {body}");
    }

    let url = format!("http://{}/api/openapi.json", runtime.addr());
    let command = schemathesis();
    // On the blocking pool: the server under test keeps running on this runtime. One
    // worker: hypothesis parses lambda sources with `ast`, which CPython 3.11 cannot do
    // from two threads at once ("AST constructor recursion depth mismatch").
    let args_url = url.clone();
    let command_name = command.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&command_name)
            .args(["run", &args_url, "--checks", "all", "--max-examples", "60", "--workers", "1", "--seed", "1"])
            .args(["--suppress-health-check", "too_slow", "--no-color"])
            .output()
    })
    .await
    .expect("schemathesis task")
    .unwrap_or_else(|error| {
        panic!(
            "cannot run {command} ({error}): scripts/test.sh installs it (pip, in a virtualenv) and sets \
                 TIDEMARK_SCHEMATHESIS; or pip install schemathesis"
        )
    });
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    runtime.shutdown().await;
}
