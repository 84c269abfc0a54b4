//! Logging: `tracing` with an env filter (`RUST_LOG` wins over `log.level`), as text or
//! JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Install the global subscriber. Call once, from a binary.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if config.format == "json" { builder.json().try_init() } else { builder.try_init() };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
}
