//! `tidemark-sim`: a deterministic sensor simulator that posts to tidemark's HTTP API
//! or writes an NDJSON workload, with ground-truth labels of the injected anomalies.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tidemark::sim::load::{LoadMode, LoadOptions};
use tidemark::sim::{self, AnomalyKind, Generator, SimConfig};

#[derive(Parser)]
#[command(
    name = "tidemark-sim",
    version,
    about = "Deterministic sensor simulator and load generator for tidemark",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    simulate: Simulate,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Drive load against the HTTP API and report events/s and request latency.
    Load(Load),
    /// Serve librdkafka's mock Kafka cluster from this process (for tests and
    /// benchmarks across processes): prints `bootstrap=HOST:PORT,…`, then reads control
    /// lines on stdin (`down ID`, `up ID`, `rtt ID MILLIS`, `topic NAME PARTITIONS`) until stdin
    /// closes.
    KafkaMock(KafkaMock),
    /// Serve the Elasticsearch stand-in (the `_bulk`/`_search` protocol tidemark uses,
    /// with fault injection at `POST /_double/faults`) until interrupted. Prints
    /// `url=http://HOST:PORT`.
    EsDouble(EsDouble),
    /// Open many WebSocket clients of the live feed (`GET /ws`), each subscribed to
    /// every alert or every prediction, read for --duration, and report what arrived
    /// and how long after it was stored.
    WsClients(WsClients),
}

#[derive(Args)]
struct WsClients {
    /// The feed's URL (add ?access_token=KEY when the gateway wants a key).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Clients subscribed to every alert.
    #[arg(long, default_value_t = 1000)]
    alerts: usize,
    /// Clients subscribed to every prediction.
    #[arg(long, default_value_t = 100)]
    predictions: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args)]
struct EsDouble {
    /// Address to listen on (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:9200")]
    listen: std::net::SocketAddr,
}

#[derive(Args)]
struct KafkaMock {
    /// Number of brokers.
    #[arg(long, default_value_t = 1)]
    brokers: i32,
    /// Topics to create, as NAME:PARTITIONS (repeatable).
    #[arg(long = "topic", default_value = "sensor-events:4")]
    topics: Vec<String>,
    /// The broker's group.initial.rebalance.delay.ms (Apache Kafka's default is 3s).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    initial_rebalance_delay: Duration,
}

#[derive(Args)]
struct Load {
    /// tidemark's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// `ndjson`: --batch-size events per request; `single`: one event per request.
    #[arg(long, default_value = "ndjson", value_parser = ["ndjson", "single"])]
    mode: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value_t = 1000)]
    sensors: u32,
    /// Target events/s over all connections (default: as fast as the server answers).
    #[arg(long)]
    rate: Option<f64>,
    /// No progress bar (for scripts).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct Simulate {
    /// tidemark's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value_t = 20)]
    sensors: u32,
    /// Events per second over all sensors.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Stream length, e.g. 60s or 10m; 0 runs until stopped.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of events sent with an earlier timestamp (out of order).
    #[arg(long, default_value_t = 0.0)]
    disorder: f64,
    /// Largest timestamp shift of an out-of-order event.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    max_disorder: Duration,
    /// Number of anomalies to inject.
    #[arg(long, default_value_t = 4)]
    anomalies: u32,
    /// Stream time before the first anomaly.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    anomalies_after: Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    anomaly_duration: Duration,
    /// Kinds to cycle through: spike, drift, stuck, dropout.
    #[arg(long, value_delimiter = ',', default_value = "spike,drift,stuck,dropout")]
    kinds: Vec<String>,
    /// Write the injected anomalies here (NDJSON).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Write the events as NDJSON to this file instead of posting them.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Event time of the first event: RFC 3339 or "now". Default: now when posting,
    /// 2026-01-01T00:00:00Z when writing (so files are reproducible).
    #[arg(long)]
    start: Option<String>,
    /// Post as fast as the server accepts instead of in real time.
    #[arg(long)]
    no_pace: bool,
    /// Produce to Kafka (HOST:PORT,…) instead of posting over HTTP.
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Topic to produce to (with --kafka-brokers).
    #[arg(long, default_value = "sensor-events")]
    kafka_topic: String,
    /// Publish to an MQTT broker (mqtt://HOST:PORT or mqtts://…) instead of posting
    /// over HTTP: QoS 1, one topic per sensor.
    #[arg(long)]
    mqtt: Option<String>,
    /// Topic of each event (with --mqtt); {sensorId} and {eventType} are filled in.
    #[arg(long, default_value = "sensors/{sensorId}/data")]
    mqtt_topic: String,
    /// Publishing clients (with --mqtt); a sensor always uses the same one.
    #[arg(long, default_value_t = 4)]
    mqtt_publishers: usize,
    /// MQTT credentials and TLS (with --mqtt).
    #[arg(long, env = "TIDEMARK_SIM_MQTT_USERNAME", default_value = "")]
    mqtt_username: String,
    #[arg(long, env = "TIDEMARK_SIM_MQTT_PASSWORD", default_value = "", hide_env_values = true)]
    mqtt_password: String,
    #[arg(long, default_value = "")]
    mqtt_ca_file: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(SimCommand::Load(load)) => run_load(load),
        Some(SimCommand::KafkaMock(mock)) => run_kafka_mock(mock),
        Some(SimCommand::EsDouble(double)) => run_es_double(double),
        Some(SimCommand::WsClients(clients)) => run_ws_clients(clients),
        None => simulate(cli.simulate),
    }
}

fn run_kafka_mock(mock: KafkaMock) -> ExitCode {
    use std::io::BufRead;
    let mut topics = Vec::new();
    for topic in &mock.topics {
        let parsed = topic.rsplit_once(':').and_then(|(name, n)| Some((name.to_string(), n.parse::<i32>().ok()?)));
        match parsed {
            Some(topic) if !topic.0.is_empty() => topics.push(topic),
            _ => {
                eprintln!("--topic: expected NAME:PARTITIONS, got {topic:?}");
                return ExitCode::from(2);
            }
        }
    }
    let started = sim::kafka::MockBroker::start(mock.brokers, &topics, mock.initial_rebalance_delay)
        .and_then(|broker| Ok((broker.bootstrap_servers()?, broker)));
    let (bootstrap, broker) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("cannot start the mock cluster: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("bootstrap={bootstrap}");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match broker.control(&line) {
            Ok(()) => println!("ok {}", line.trim()),
            Err(error) => println!("error {error:#}"),
        }
        let _ = std::io::stdout().flush();
    }
    ExitCode::SUCCESS
}

fn run_es_double(args: EsDouble) -> ExitCode {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        match sim::es_double::EsDouble::start(args.listen).await {
            Ok(double) => {
                println!("url={}", double.url());
                let _ = std::io::stdout().flush();
                let _ = tokio::signal::ctrl_c().await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("cannot listen on {}: {error}", args.listen);
                ExitCode::FAILURE
            }
        }
    })
}

fn run_ws_clients(clients: WsClients) -> ExitCode {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    let options = sim::ws::WsClientOptions {
        url: clients.url,
        alerts: clients.alerts,
        predictions: clients.predictions,
        duration: clients.duration,
    };
    match runtime.block_on(sim::ws::run(options)) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.failed_to_connect > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(error) => {
            eprintln!("tidemark-sim ws-clients: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_load(load: Load) -> ExitCode {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    let options = LoadOptions {
        url: load.url,
        mode: if load.mode == "single" { LoadMode::Single } else { LoadMode::Ndjson },
        concurrency: load.concurrency.max(1),
        duration: load.duration,
        batch_size: load.batch_size.max(1),
        sensors: load.sensors,
        rate: load.rate,
        progress: !load.quiet,
    };
    match runtime.block_on(sim::load::run(options)) {
        Ok(report) => {
            eprintln!(
                "{} events/s ({} requests/s), latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms; {} refused (503), {} errors",
                report.events_per_second as u64,
                report.requests_per_second as u64,
                report.latency_p50_ms,
                report.latency_p95_ms,
                report.latency_p99_ms,
                report.refused_503,
                report.errors
            );
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(error) => {
            eprintln!("tidemark-sim load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn simulate(cli: Simulate) -> ExitCode {
    let mut kinds = Vec::new();
    for name in &cli.kinds {
        match AnomalyKind::parse(name.trim()) {
            Some(kind) => kinds.push(kind),
            None => {
                eprintln!("--kinds: unknown anomaly kind {name:?} (spike, drift, stuck, dropout)");
                return ExitCode::from(2);
            }
        }
    }
    let start_ms = match cli.start.as_deref() {
        None if cli.write.is_some() => SimConfig::default().start_ms,
        None | Some("now") => chrono::Utc::now().timestamp_millis(),
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) => time.timestamp_millis(),
            Err(error) => {
                eprintln!("--start: {text:?} is not RFC 3339: {error}");
                return ExitCode::from(2);
            }
        },
    };
    let config = SimConfig {
        sensors: cli.sensors,
        rate: cli.rate,
        duration: (!cli.duration.is_zero()).then_some(cli.duration),
        seed: cli.seed,
        start_ms,
        disorder: cli.disorder,
        max_disorder: cli.max_disorder,
        anomalies: cli.anomalies,
        anomalies_after: cli.anomalies_after,
        anomaly_spacing: None,
        anomaly_duration: cli.anomaly_duration,
        anomaly_kinds: kinds,
    };
    if config.duration.is_none() && cli.write.is_some() {
        eprintln!("--write needs a finite --duration");
        return ExitCode::from(2);
    }
    let generator = Generator::new(config);
    if let Some(path) = &cli.labels
        && let Err(error) = std::fs::write(path, sim::labels_ndjson(generator.anomalies()))
    {
        eprintln!("cannot write labels to {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    if let Some(path) = &cli.write {
        return write_file(path, generator);
    }
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("cannot start the async runtime");
        return ExitCode::FAILURE;
    };
    if let Some(url) = cli.mqtt.clone() {
        return runtime.block_on(publish_mqtt(url, cli, generator));
    }
    if let Some(brokers) = cli.kafka_brokers.clone() {
        return runtime.block_on(async move {
            match sim::kafka::produce_stream(&brokers, &cli.kafka_topic, generator, !cli.no_pace).await {
                Ok(count) => {
                    eprintln!("produced {count} events to {} (all acknowledged)", cli.kafka_topic);
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("tidemark-sim: {error:#}");
                    ExitCode::FAILURE
                }
            }
        });
    }
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let mut last_report = std::time::Instant::now();
        let stats =
            sim::http::post_stream(&client, &cli.url, generator, Duration::from_millis(100), !cli.no_pace, |stats| {
                if last_report.elapsed() >= Duration::from_secs(5) {
                    last_report = std::time::Instant::now();
                    eprintln!(
                        "sent {} events ({} accepted, {} rejected, {} retries, {} failures)",
                        stats.events_sent, stats.accepted, stats.rejected, stats.retries, stats.failures
                    );
                }
            })
            .await;
        println!("{}", serde_json::to_string_pretty(&stats).unwrap_or_default());
        if stats.failures > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    })
}

async fn publish_mqtt(url: String, cli: Simulate, generator: Generator) -> ExitCode {
    let sources = tidemark::config::ConfigSources::default()
        .with("mqtt.url", url.clone())
        .with("mqtt.client_id", format!("tidemark-sim-{}", std::process::id()))
        .with("mqtt.username", cli.mqtt_username.clone())
        .with("mqtt.password", cli.mqtt_password.clone())
        .with("mqtt.ca_file", cli.mqtt_ca_file.clone());
    let config = match tidemark::config::Config::load(&sources) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("tidemark-sim: {errors}");
            return ExitCode::from(2);
        }
    };
    let started = std::time::Instant::now();
    match sim::mqtt::publish_stream(&config.mqtt, &cli.mqtt_topic, generator, cli.mqtt_publishers, !cli.no_pace).await {
        Ok(count) => {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "published {count} events to {url} in {seconds:.2} s ({:.0}/s, all acknowledged by the broker)",
                count as f64 / seconds.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tidemark-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_file(path: &PathBuf, generator: Generator) -> ExitCode {
    let file = match std::fs::File::create(path) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("cannot create {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut line = String::with_capacity(128);
    let mut count = 0u64;
    for event in generator {
        line.clear();
        event.write_json(&mut line);
        if let Err(error) = out.write_all(line.as_bytes()) {
            eprintln!("cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        count += 1;
    }
    if let Err(error) = out.flush() {
        eprintln!("cannot write {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!("wrote {count} events to {}", path.display());
    ExitCode::SUCCESS
}
