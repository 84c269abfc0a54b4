//! Fault injection (`--features chaos`): partition panics and failing store batches do
//! not change a single result; a poison event is quarantined; a partition that keeps
//! failing exhausts its restart budget and escalates up the tree.

#[cfg(not(feature = "chaos"))]
#[test]
fn chaos_tests_need_the_chaos_feature() {
    panic!("the fault-injection tests need `--features chaos`; scripts/test.sh runs them");
}

#[cfg(feature = "chaos")]
mod common;

#[cfg(feature = "chaos")]
mod with_chaos {
    use std::time::Duration;

    use super::common::{
        Client, all_predictions, comparable, eventually, fresh_postgres_database, post_batches, sources, start,
        workload,
    };
    use serde_json::json;
    use tidemark::config::ConfigSources;
    use tidemark::sim::SimConfig;

    fn pipeline(dir: &std::path::Path) -> ConfigSources {
        sources(dir)
            .with("pipeline.window", "2s")
            .with("pipeline.max_out_of_orderness", "1s")
            .with("pipeline.allowed_lateness", "1s")
            .with("pipeline.partitions", 4)
            .with("pipeline.idle_timeout", "1h")
            .with("scoring.warmup_windows", 2)
            .with("supervision.max_restarts", 1000)
            // A panic every ~1,000 events: replays must be shorter than that to finish.
            .with("checkpoint.max_events", 250)
    }

    /// 40,000 events of 300 sensors over 10 s of event time, 5 % of them out of order
    /// by up to 2.5 s (some beyond the lateness: dead-lettered, identically each run).
    fn chaos_workload() -> Vec<String> {
        workload(SimConfig {
            sensors: 300,
            rate: 4000.0,
            duration: Some(Duration::from_secs(10)),
            seed: 7,
            disorder: 0.05,
            max_disorder: Duration::from_millis(2500),
            anomalies: 6,
            anomalies_after: Duration::from_secs(4),
            anomaly_duration: Duration::from_secs(3),
            ..SimConfig::default()
        })
    }

    async fn run(config: ConfigSources, lines: &[String]) -> (Vec<String>, u64, u64, u64) {
        let runtime = start(config).await;
        let client = Client::new(&runtime);
        let accepted = post_batches(&client, lines, 500, Duration::from_millis(200)).await;
        assert_eq!(accepted, lines.len() as u64);
        // Let every partition settle (restarted ones replay) before the end-of-input flush.
        eventually(Duration::from_secs(30), "all partitions live and caught up", || async {
            let status = client.get_ok("/api/status").await;
            let partitions = status["partitions"].as_array().cloned().unwrap_or_default();
            partitions.iter().all(|p| p["live"] == true && p["inFlightEvents"] == 0).then_some(())
        })
        .await;
        runtime.flush_all(Duration::from_secs(30)).await.expect("flush");
        let rows = all_predictions(&client).await;
        let late = client.get_ok("/api/dead-letters?reason=late&limit=1").await["totalsByReason"]["late"]
            .as_u64()
            .unwrap_or(0);
        let status = client.get_ok("/api/status").await;
        let restarts: u64 = status["partitions"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["restarts"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        let sink_failures = status["sinks"][0]["failures"].as_u64().unwrap_or(0);
        let counted: u64 = rows.iter().map(|row| row["eventCount"].as_u64().unwrap_or(0)).sum();
        assert_eq!(counted + late, accepted, "every accepted event is in one window or late");
        runtime.shutdown().await;
        (comparable(&rows), late, restarts, sink_failures)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_and_store_failures_do_not_change_results() {
        panics_and_store_failures(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_and_store_failures_do_not_change_results_on_postgres() {
        panics_and_store_failures(true).await;
    }

    async fn panics_and_store_failures(postgres: bool) {
        let lines = chaos_workload();
        let pipeline = |dir: &std::path::Path, url: Option<String>| match url {
            Some(url) => pipeline(dir).with("store.url", url),
            None => pipeline(dir),
        };
        let url = || async move { if postgres { Some(fresh_postgres_database().await) } else { None } };
        assert!(lines.len() >= 30_000);
        let clean_dir = tempfile::tempdir().expect("temp dir");
        let (clean, clean_late, clean_restarts, _) = run(pipeline(clean_dir.path(), url().await), &lines).await;
        assert_eq!(clean_restarts, 0);
        assert!(clean_late > 0, "the workload has late events");

        let chaos_dir = tempfile::tempdir().expect("temp dir");
        let chaos = pipeline(chaos_dir.path(), url().await)
            .with("chaos.partition_panic_probability", 0.001)
            .with("chaos.store_batch_failure_rate", 0.2)
            .with("chaos.seed", 11);
        let (faulty, faulty_late, restarts, sink_failures) = run(chaos, &lines).await;
        assert!(restarts > 0, "partitions were restarted");
        assert!(sink_failures > 0, "store batches failed");
        assert_eq!(clean_late, faulty_late);
        assert_eq!(clean.len(), faulty.len());
        assert_eq!(clean, faulty, "identical results row for row");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_event_is_quarantined_and_the_rest_is_correct() {
        let lines = workload(SimConfig {
            sensors: 50,
            rate: 1000.0,
            duration: Some(Duration::from_secs(6)),
            anomalies: 0,
            ..SimConfig::default()
        });
        let clean_dir = tempfile::tempdir().expect("temp dir");
        let (clean, ..) = run(pipeline(clean_dir.path()), &lines).await;

        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = start(pipeline(dir.path()).with("chaos.poison_sensor_id", "poison")).await;
        let client = Client::new(&runtime);
        let (first, rest) = lines.split_at(lines.len() / 2);
        let mut accepted = post_batches(&client, first, 250, Duration::from_millis(100)).await;
        let poison =
            json!({"sensorId": "poison", "eventType": "temperature", "value": 1.0, "timestamp": 1_767_225_603_000i64});
        let (status, body) = client.post_json(&poison).await;
        assert_eq!(status, 202, "{body}");
        accepted += 1;
        accepted += post_batches(&client, rest, 250, Duration::from_millis(100)).await;
        assert_eq!(accepted, lines.len() as u64 + 1);

        let letter = eventually(Duration::from_secs(20), "the poison event in the dead-letter store", || async {
            let body = client.get_ok("/api/dead-letters?reason=poison").await;
            (body["count"] == 1).then(|| body["items"][0].clone())
        })
        .await;
        assert_eq!(letter["sensorId"], "poison");
        let error = letter["error"].as_str().unwrap_or("");
        assert!(error.contains("crashed partition") && error.contains("chaos: poison event"), "{error}");
        eventually(Duration::from_secs(20), "partitions live", || async {
            let status = client.get_ok("/api/status").await;
            status["partitions"].as_array()?.iter().all(|p| p["live"] == true && p["inFlightEvents"] == 0).then_some(())
        })
        .await;
        runtime.flush_all(Duration::from_secs(20)).await.expect("flush");
        let rows = all_predictions(&client).await;
        assert!(rows.iter().all(|row| row["sensorId"] != "poison"));
        assert_eq!(comparable(&rows), clean, "every other window is correct");
        runtime.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_that_keeps_failing_escalates_to_the_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut runtime = start(
            pipeline(dir.path())
                .with("chaos.poison_sensor_id", "poison")
                .with("supervision.max_event_attempts", 1000)
                .with("supervision.max_restarts", 3)
                .with("supervision.restart_window", "60s"),
        )
        .await;
        let client = Client::new(&runtime);
        let poison = json!({"sensorId": "poison", "eventType": "temperature", "value": 1.0});
        let (status, body) = client.post_json(&poison).await;
        assert_eq!(status, 202, "{body}");
        // partition: 3 restarts, then its supervisor fails; the root restarts that subtree
        // 3 times (each crash-looping again), then stops.
        tokio::time::timeout(Duration::from_secs(30), runtime.stopped())
            .await
            .expect("the root stops once its restart budget is spent");
        let metrics = runtime.metrics().render();
        assert!(
            metrics.contains("tidemark_actor_restarts_total{actor=\"partition-supervisor\"} 3"),
            "{}",
            metrics.lines().filter(|l| l.contains("restarts")).collect::<Vec<_>>().join("\n")
        );
        runtime.shutdown().await;
    }

    /// Liveness under repeated faults: one panic per 100 events and a fifth of store
    /// batches failing, with the default supervision and checkpoint settings. Every
    /// window of the small scenario still appears within 30 s of the stream's end,
    /// identical to a calm run: restarts that move the checkpoint forward are forgiven,
    /// and a partition that keeps crashing checkpoints more and more often.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_faults_still_converge_within_30_s() {
        let lines = workload(SimConfig {
            sensors: 5,
            rate: 50.0,
            duration: Some(Duration::from_secs(60)),
            seed: 5,
            anomalies: 2,
            anomalies_after: Duration::from_secs(20),
            anomaly_duration: Duration::from_secs(4),
            ..SimConfig::default()
        });
        let scenario = |dir: &std::path::Path| {
            sources(dir)
                .with("pipeline.window", "2s")
                .with("pipeline.max_out_of_orderness", "0s")
                .with("pipeline.partitions", 2)
                .with("pipeline.idle_timeout", "2s")
                .with("scoring.warmup_windows", 2)
        };
        let settle = |runtime: &tidemark::runtime::Runtime, expected: Option<usize>| {
            let client = Client::new(runtime);
            async move {
                let started = std::time::Instant::now();
                let rows = eventually(Duration::from_secs(30), "every window of the stream", || async {
                    let rows = all_predictions(&client).await;
                    let done = match expected {
                        Some(expected) => rows.len() >= expected,
                        None => rows.len() >= 150,
                    };
                    done.then_some(rows)
                })
                .await;
                (comparable(&rows), started.elapsed())
            }
        };
        let calm_dir = tempfile::tempdir().expect("temp dir");
        let calm_runtime = start(scenario(calm_dir.path())).await;
        let accepted = post_batches(&Client::new(&calm_runtime), &lines, 100, Duration::from_millis(100)).await;
        assert_eq!(accepted, lines.len() as u64);
        let (calm, _) = settle(&calm_runtime, None).await;
        calm_runtime.shutdown().await;
        assert_eq!(calm.len(), 150, "5 sensors x 30 windows");

        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = start(
            scenario(dir.path())
                .with("chaos.partition_panic_probability", 0.01)
                .with("chaos.store_batch_failure_rate", 0.2)
                .with("chaos.seed", 3),
        )
        .await;
        let client = Client::new(&runtime);
        let accepted = post_batches(&client, &lines, 100, Duration::from_millis(100)).await;
        assert_eq!(accepted, lines.len() as u64);
        let (faulty, took) = settle(&runtime, Some(calm.len())).await;
        let status = client.get_ok("/api/status").await;
        let restarts: u64 = status["partitions"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["restarts"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        eprintln!("{restarts} partition restarts; every window {took:?} after the stream ended");
        assert!(restarts >= 10, "the faults happened: {restarts} restarts");
        assert_eq!(faulty, calm, "identical to the calm run");
        runtime.shutdown().await;
    }
}
