//! Consuming a Kafka backlog, with the broker in a separate process (`tidemark-sim
//! kafka-mock`: librdkafka's mock cluster served over loopback TCP), next to `tidemark
//! replay` of the same events from a file, measured in the same run.
//!
//! The backlog is produced before tidemark starts (not timed). Then one tidemark instance
//! (default settings, SQLite store) joins the group and consumes it; timed:
//! - from process start (the runtime's start) to the last event processed and every
//!   window it fired written to the store;
//! - from the first message received to the same point.
//!
//!   cargo bench --bench kafka_replay                                  # 1,500,000 events, 16 partitions
//!   TIDEMARK_BENCH_EVENTS=3000000 TIDEMARK_BENCH_PARTITIONS=32 cargo bench --bench kafka_replay
//!
//! The mock cluster keeps about 5 MB per partition: use enough partitions for big backlogs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark::config::{Config, ConfigSources};
use tidemark::replay::{ReplayOptions, SinkKind};
use tidemark::runtime::Runtime;
use tidemark::sim::{Generator, SimConfig};

const TOPIC: &str = "sensor-events";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn workload(events: u64) -> SimConfig {
    SimConfig {
        sensors: 1000,
        rate: 10_000.0,
        duration: Some(Duration::from_millis(events / 10)),
        disorder: 0.1,
        max_disorder: Duration::from_secs(2),
        anomalies: 0,
        seed: 1,
        // Event times of the last minutes, as a live backlog would have.
        start_ms: chrono::Utc::now().timestamp_millis() - (events / 10) as i64,
        ..SimConfig::default()
    }
}

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.split_whitespace().skip(1).collect()))
        .unwrap_or_default()
}

/// CPU seconds used so far by this process's threads, by thread name.
fn thread_cpu() -> std::collections::BTreeMap<String, f64> {
    let mut cpu = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return cpu;
    };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: utime is the 12th, stime the 13th.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
        let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
        *cpu.entry(name).or_insert(0.0) += ticks / 100.0;
    }
    cpu
}

fn main() {
    let events = env_number("TIDEMARK_BENCH_EVENTS", 1_500_000);
    let partitions = env_number("TIDEMARK_BENCH_PARTITIONS", 16) as u32;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");

    // The broker, in its own process.
    let mut broker = Command::new(env!("CARGO_BIN_EXE_tidemark-sim"))
        .args(["kafka-mock", "--topic", &format!("{TOPIC}:{partitions}"), "--topic", &format!("{TOPIC}.dlq:1")])
        .args(["--initial-rebalance-delay", "0s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tidemark-sim kafka-mock");
    let mut lines = BufReader::new(broker.stdout.take().expect("stdout")).lines();
    let brokers = lines
        .next()
        .and_then(Result::ok)
        .and_then(|line| line.strip_prefix("bootstrap=").map(str::to_string))
        .expect("bootstrap servers");

    let config = workload(events);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backlog.ndjson");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("file"));
        let mut line = String::new();
        for event in Generator::new(config.clone()) {
            line.clear();
            event.write_json(&mut line);
            out.write_all(line.as_bytes()).expect("write");
        }
        out.flush().expect("flush");
    }
    let produced_at = Instant::now();
    let produced = runtime
        .block_on(tidemark::sim::kafka::produce_stream(&brokers, TOPIC, Generator::new(config), false))
        .expect("produce");
    eprintln!(
        "produced {produced} events into {partitions} partitions in {:.1} s (not timed)",
        produced_at.elapsed().as_secs_f64()
    );

    let settings = |store: &str| {
        ConfigSources::default()
            .with("http.listen", "127.0.0.1:0")
            .with("store.url", store)
            .with("pipeline.partitions", i64::from(partitions))
            .with("log.level", "warn")
    };

    // The same events from a file, through the same pipeline.
    let replay_config =
        Config::load(&settings(&format!("sqlite://{}", dir.path().join("replay.db").display()))).expect("config");
    let report = runtime
        .block_on(tidemark::replay::run(
            replay_config,
            ReplayOptions { input: file, output: None, dead_letters: None, sink: SinkKind::Store, parsers: 2 },
        ))
        .expect("replay");
    println!(
        "tidemark replay: {} events in {:.3} s = {:.0} events/s (file, store sink)",
        report.events, report.wall_seconds, report.events_per_second
    );

    let config = Config::load(
        &settings(&format!("sqlite://{}", dir.path().join("kafka.db").display()))
            .with("kafka.enabled", true)
            .with("ingest.mode", "kafka")
            .with("kafka.brokers", brokers.as_str()),
    )
    .expect("config");
    runtime.block_on(async move {
        let cpu_before = thread_cpu();
        let started = Instant::now();
        let tidemark = Arc::new(Runtime::start(config).await.expect("start"));
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first_message = None;
        loop {
            let processed: u64 = (0..partitions).map(|p| tidemark.router().status(p).processed_position).sum();
            if processed > 0 && first_message.is_none() {
                first_message = Some((started.elapsed(), processed));
            }
            if processed >= produced {
                break;
            }
            assert!(Instant::now() < deadline, "not done within 10 minutes ({processed} of {produced})");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tidemark.flush_sinks(Duration::from_secs(60)).await.expect("store written");
        let total = started.elapsed().as_secs_f64();
        let (joined, already) = first_message.unwrap_or((Duration::ZERO, 0));
        let consuming = total - joined.as_secs_f64();
        println!(
            "kafka backlog: {produced} events; first message {:.3} s after start; {:.0} events/s from the first \
             message to the last window written ({:.3} s); {:.0} events/s from process start ({total:.3} s); peak \
             RSS {} (bench process: tidemark + generator)",
            joined.as_secs_f64(),
            (produced - already) as f64 / consuming.max(1e-9),
            consuming,
            produced as f64 / total,
            peak_rss()
        );
        let cpu: Vec<String> = thread_cpu()
            .into_iter()
            .map(|(name, seconds)| (name.clone(), seconds - cpu_before.get(&name).copied().unwrap_or(0.0)))
            .filter(|(_, seconds)| *seconds >= 0.01)
            .map(|(name, seconds)| format!("{name} {seconds:.2}"))
            .collect();
        println!("CPU seconds while consuming, by thread: {}", cpu.join(", "));
        if let Ok(tidemark) = Arc::try_unwrap(tidemark) {
            tidemark.shutdown().await;
        }
    });
    drop(broker.stdin.take());
    let _ = broker.wait();
}
