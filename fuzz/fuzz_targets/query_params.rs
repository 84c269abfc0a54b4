//! Query strings of the read API: any text is a query or a 400 naming a parameter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::actors::gateway::query::predictions_query;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        match predictions_query(Some(raw)) {
            Ok(query) => assert!((1..=1000).contains(&query.limit)),
            Err(error) => assert_eq!(error.status.as_u16(), 400),
        }
    }
});
