//! Page cursors: any text decodes to a position or is refused, and a decoded cursor
//! encodes back to the same position.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark::actors::gateway::params::{decode_cursor, encode_cursor};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(cursor) = decode_cursor(text)
    {
        assert_eq!(decode_cursor(&encode_cursor(cursor)), Some(cursor));
    }
});
