//! Replay throughput from Kafka: a workload is produced into librdkafka's in-process
//! cluster (not timed), then one tidemark instance consumes the topic from offset 0 and
//! is timed until every event is processed.
//!
//!   cargo bench --bench kafka_replay                         # 2,000,000 events
//!   TIDEMARK_BENCH_EVENTS=5000000 cargo bench --bench kafka_replay

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use tidemark::config::{Config, ConfigSources};
use tidemark::runtime::Runtime;
use tidemark::sim::{Generator, SimConfig};

const TOPIC: &str = "sensor-events";
const PARTITIONS: u32 = 4;

fn main() {
    let events: u64 = std::env::var("TIDEMARK_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    runtime.block_on(async move {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(TOPIC, PARTITIONS as i32, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let workload = Generator::new(SimConfig {
            sensors: 1000,
            rate: 10_000.0,
            duration: Some(Duration::from_millis(events / 10)),
            disorder: 0.1,
            max_disorder: Duration::from_secs(4),
            anomalies: 0,
            seed: 1,
            ..SimConfig::default()
        });
        let produced_at = Instant::now();
        let produced = tidemark::sim::kafka::produce_stream(&brokers, TOPIC, workload, false).await.expect("produce");
        eprintln!("produced {produced} events in {:.1} s (not timed)", produced_at.elapsed().as_secs_f64());

        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::load(
            &ConfigSources::default()
                .with("http.listen", "127.0.0.1:0")
                .with("store.url", format!("sqlite://{}", dir.path().join("bench.db").display()))
                .with("kafka.enabled", true)
                .with("ingest.mode", "kafka")
                .with("kafka.brokers", brokers.as_str())
                .with("pipeline.partitions", i64::from(PARTITIONS))
                .with("log.level", "warn")
                // The mock broker answers a fetch with about one batch per partition and
                // then waits out fetch.wait.max.ms; a real broker returns as soon as data is
                // there. TIDEMARK_BENCH_FETCH_WAIT_MS shows the effect.
                .with(
                    "kafka.properties.fetch_wait_max_ms",
                    std::env::var("TIDEMARK_BENCH_FETCH_WAIT_MS").ok().and_then(|v| v.parse::<i64>().ok()).unwrap_or(50),
                ),
        )
        .expect("config");
        let started = Instant::now();
        let tidemark = Runtime::start(config).await.expect("start");
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first_event = None;
        loop {
            let processed: u64 = (0..PARTITIONS).map(|p| tidemark.router().status(p).processed_position).sum();
            if processed > 0 && first_event.is_none() {
                first_event = Some((started.elapsed(), processed));
            }
            if processed >= produced {
                break;
            }
            assert!(Instant::now() < deadline, "not done within 10 minutes ({processed} of {produced})");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some((joined, already)) = first_event {
            let consuming = seconds - joined.as_secs_f64();
            println!(
                "joined the group and got the first events after {:.2} s; then {:.0} events/s",
                joined.as_secs_f64(),
                (produced - already) as f64 / consuming.max(1e-9)
            );
        }
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
            .unwrap_or_default();
        println!(
            "kafka replay: {produced} events in {seconds:.3} s = {:.0} events/s (from start-up to the last event processed; {rss})",
            produced as f64 / seconds
        );
        tidemark.shutdown().await;
    });
}
