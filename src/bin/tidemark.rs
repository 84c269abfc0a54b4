//! `tidemark`: the runtime CLI (run, demo, check-config, migrate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark::config::{Config, ConfigSources};
use tidemark::runtime::Runtime;
use tidemark::sim::{self, Generator, SimConfig};

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Real-time sensor analytics: windows, anomaly scores and alerts in one supervised program"
)]
struct Cli {
    /// Configuration file (TOML), layered over the embedded defaults and under
    /// TIDEMARK__SECTION__KEY environment variables.
    #[arg(long, short, global = true, env = "TIDEMARK_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the runtime until SIGTERM or Ctrl-C.
    Run,
    /// Run the runtime with short windows and a built-in simulator feeding it.
    Demo {
        #[arg(long, default_value_t = 20)]
        sensors: u32,
        /// Events per second over all sensors.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write the injected anomalies (ground truth).
        #[arg(long, default_value = "data/demo-labels.ndjson")]
        labels: PathBuf,
    },
    /// Run an NDJSON file of events through the pipeline as fast as it goes (backfill,
    /// backtest, benchmark); prints events/s and wall time.
    Replay {
        /// Events, one JSON object per line.
        #[arg(long)]
        input: PathBuf,
        /// Write each window result as one JSON line here.
        #[arg(long)]
        output: Option<PathBuf>,
        /// `none`: results are only counted (and written to --output); `store`: they go
        /// through the store sink to store.url.
        #[arg(long, default_value = "none", value_parser = ["none", "store"])]
        sink: String,
        /// Keep rejected and late events here (NDJSON) with --sink none.
        #[arg(long)]
        dead_letters: Option<PathBuf>,
        /// Parser threads (default: the number of cores).
        #[arg(long)]
        parsers: Option<usize>,
    },
    /// Score `timestamp,value` CSV files with the pipeline's scoring code, one value per
    /// window, and write the same tree with an `anomaly_score` column (NAB's layout).
    ScoreCsv {
        /// Model (default: scoring.model of the configuration).
        #[arg(long)]
        model: Option<String>,
        /// A CSV file's directory, searched recursively.
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// Validate the configuration and print it (secrets redacted).
    CheckConfig,
    /// Create or upgrade the store's schema, then exit.
    Migrate,
    /// Check the configuration, the store (reachable, schema), the clock, Kafka (brokers,
    /// topic, partitions, group lag), MQTT and Elasticsearch; exits 1 when a check fails.
    /// Reads only: safe beside running instances (e.g. as an init container).
    Doctor,
    /// Make an API key (or take KEY) and print it with its `[[auth.api_keys]]` entry.
    HashKey {
        /// The key's name, shown in logs and errors.
        #[arg(long, default_value = "client")]
        name: String,
        /// Comma-separated scopes: ingest, read, admin.
        #[arg(long, default_value = "ingest,read")]
        scopes: String,
        /// An existing key to hash instead of a new random one.
        key: Option<String>,
    },
}

fn load(sources: ConfigSources) -> Result<Config, ExitCode> {
    Config::load(&sources).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = ConfigSources::from_process(cli.config.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::HashKey { name, scopes, key } => {
                let scopes: Vec<String> = scopes.split(',').map(|s| format!("{:?}", s.trim())).collect();
                let key = key.unwrap_or_else(tidemark::auth::generate_key);
                println!("# API key (give it to the client; it is not stored anywhere): {key}");
                println!("[[auth.api_keys]]");
                println!("name = {name:?}");
                println!("sha256 = {:?}", tidemark::auth::hash_key(&key));
                println!("scopes = [{}]", scopes.join(", "));
                ExitCode::SUCCESS
            }
            Command::CheckConfig => match load(sources) {
                Ok(config) => {
                    print!("{}", config.to_redacted_toml());
                    eprintln!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            Command::Doctor => {
                let report = match Config::load(&sources) {
                    Ok(config) => tidemark::doctor::run(&config).await,
                    Err(errors) => tidemark::doctor::invalid_configuration(&errors),
                };
                print!("{report}");
                if report.failed() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
            }
            Command::Migrate => {
                let config = match load(sources) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                let _logs = tidemark::telemetry::init(&config.log, &Default::default());
                match tidemark::store::open(&config.store).await {
                    Ok(store) => {
                        eprintln!("store {} is migrated", tidemark::config::redact_url(&config.store.url));
                        store.close().await;
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("migration failed: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::ScoreCsv { model, input, output } => {
                let sources = match model {
                    Some(model) => sources.with("scoring.model", model),
                    None => sources,
                };
                let config = match load(sources) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                let Some(scorer) = tidemark::scoring::Scorer::from_name(&config.scoring.model, &config.scoring) else {
                    eprintln!("unknown model {:?}", config.scoring.model);
                    return ExitCode::from(2);
                };
                match tidemark::score_csv::run(&scorer, &input, &output) {
                    Ok(report) => {
                        eprintln!(
                            "scored {} rows of {} files with {} in {:.2} s ({:.0} rows/s) into {}",
                            report.rows,
                            report.files,
                            scorer.name(),
                            report.seconds,
                            report.rows as f64 / report.seconds.max(1e-9),
                            output.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("score-csv: {error}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Replay { input, output, sink, dead_letters, parsers } => {
                let config = match load(sources) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
                let telemetry = tidemark::telemetry::init(&config.log, &config.telemetry);
                let options = tidemark::replay::ReplayOptions {
                    input,
                    output,
                    dead_letters,
                    sink: if sink == "store" { tidemark::replay::SinkKind::Store } else { tidemark::replay::SinkKind::None },
                    parsers: parsers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                };
                let outcome = tidemark::replay::run(config, options).await;
                telemetry.shutdown().await;
                match outcome {
                    Ok(report) => {
                        eprintln!(
                            "replayed {} events in {:.3} s: {:.0} events/s ({} windows, {} rejected, {} late; start-up {:.1} ms, peak RSS {} MiB)",
                            report.events,
                            report.wall_seconds,
                            report.events_per_second,
                            report.windows,
                            report.rejected,
                            report.late,
                            report.startup_ms,
                            report.peak_rss_bytes >> 20
                        );
                        println!("{}", serde_json::to_string(&report).unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("tidemark replay: {error:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Run => match load(sources.clone()) {
                Ok(config) => serve(config, sources, None).await,
                Err(code) => code,
            },
            Command::Demo { sensors, rate, seed, labels } => {
                let sources = tidemark::sim::demo_presets(sources);
                match load(sources.clone()) {
                    Ok(config) => {
                        let demo = SimConfig::demo(sensors, rate, seed, chrono::Utc::now().timestamp_millis());
                        serve(config, sources, Some((demo, labels))).await
                    }
                    Err(code) => code,
                }
            }
        }
    })
}

async fn serve(config: Config, sources: ConfigSources, demo: Option<(SimConfig, PathBuf)>) -> ExitCode {
    let telemetry = tidemark::telemetry::init(&config.log, &config.telemetry);
    let mut runtime = match Runtime::start(config).await {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start: {error:#}");
            eprintln!("tidemark: cannot start: {error:#}");
            telemetry.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    let base = format!("http://{}", runtime.addr());
    let reloader = tokio::spawn(reload_rules_on_hangup(runtime.rules(), sources));
    let simulator = demo.map(|(sim_config, labels_path)| {
        let generator = Generator::new(sim_config.clone());
        if let Some(parent) = labels_path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(error) = std::fs::write(&labels_path, sim::labels_ndjson(generator.anomalies())) {
            tracing::warn!(path = %labels_path.display(), %error, "cannot write labels");
        }
        println!(
            "tidemark demo: {} simulated sensors, {} events/s, {} windows, serving {base}\n\
             \n  curl -s '{base}/api/predictions?limit=5'\n  curl -s '{base}/api/alerts'\n  curl -s '{base}/api/summary?minutes=5'\n  \
             curl -s '{base}/api/sensors/top?minutes=5&by=maxValue&n=5'\n  curl -s '{base}/api/status'\n\
             \nFirst windows appear after ~7 s; models learn for {} windows before they judge; anomalies \
             are injected from {} (ground truth in {}). Ctrl-C stops.",
            sim_config.sensors,
            sim_config.rate,
            humantime::format_duration(runtime.config().pipeline.window),
            runtime.config().scoring.learning_windows,
            humantime::format_duration(sim_config.anomalies_after),
            labels_path.display()
        );
        let url = base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            sim::http::post_stream(&client, &url, generator, Duration::from_millis(100), true, |_| {}).await
        })
    });
    let exit = tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("shutdown requested");
            if let Some(simulator) = &simulator {
                simulator.abort();
            }
            let report = runtime.shutdown().await;
            if report.partitions_checkpointed == report.partitions && report.sink_drained {
                ExitCode::SUCCESS
            } else {
                eprintln!("tidemark: shutdown incomplete: {report:?}");
                ExitCode::FAILURE
            }
        }
        () = runtime.stopped() => {
            eprintln!("tidemark: the supervision tree stopped (restart budget exhausted); see the log");
            ExitCode::FAILURE
        }
    };
    reloader.abort();
    telemetry.shutdown().await;
    exit
}

/// `kill -HUP`: read the configuration again and put its alert rules in force. Other
/// settings need a restart; a configuration with errors changes nothing.
async fn reload_rules_on_hangup(rules: std::sync::Arc<tidemark::rules::RulesHandle>, sources: ConfigSources) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangup.recv().await.is_some() {
            match Config::load(&sources) {
                Ok(config) => {
                    let reloaded = tidemark::rules::Rules::from_config(&config.rules);
                    let names: Vec<String> = reloaded.iter().map(|rule| rule.name.to_string()).collect();
                    rules.replace(reloaded);
                    tracing::info!(rules = ?names, "alert rules reloaded");
                }
                Err(errors) => tracing::error!("alert rules not reloaded, the configuration has errors:\n{errors}"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (rules, sources);
        std::future::pending::<()>().await;
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
