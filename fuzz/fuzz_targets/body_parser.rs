//! `POST /api/events` bodies, as JSON and as NDJSON: any bytes give events or
//! rejections (or a whole-body error), never a panic; every accepted event is finite and
//! inside the documented bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::ingest::{BodyFormat, ParseLimits, parse_body};

fuzz_target!(|data: &[u8]| {
    let limits = ParseLimits { max_string_bytes: 256, max_future_skew_ms: Some(300_000) };
    let now = 1_767_225_600_000;
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        if let Ok(parsed) = parse_body(data, format, limits, now) {
            for event in &parsed.events {
                assert!(event.value.is_finite());
                assert!(!event.sensor_id.is_empty() && event.sensor_id.len() <= 256);
                assert!(event.timestamp_ms >= 0 && event.timestamp_ms <= now + 300_000);
            }
        }
    }
});
