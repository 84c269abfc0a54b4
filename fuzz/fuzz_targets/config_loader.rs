//! Configuration files: any text gives a configuration or a list of problems, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match tidemark::config::Config::from_toml_str(text) {
            Ok(config) => assert!(config.pipeline.partitions >= 1),
            Err(errors) => assert!(!errors.0.is_empty()),
        }
    }
});
