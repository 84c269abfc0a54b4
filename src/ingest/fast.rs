//! A fast path for the common shape of an event: a flat JSON object whose strings have
//! no escapes. It produces exactly what the serde decoder in [`super::parse`] would,
//! and declines (returns `None`) on anything else — escapes, nested values, numbers
//! serde_json reads in another way, any syntax error — so the serde decoder handles it
//! and reports errors in its words. Property tests check the two agree.

use std::borrow::Cow;

use super::parse::{RawEvent, Scalar};

/// Read one object starting at `text[start..]` (after optional whitespace). Returns the
/// fields and the index just after the closing brace, or `None` to let serde decide.
pub(super) fn object(text: &str, start: usize) -> Option<(RawEvent<'_>, usize)> {
    let bytes = text.as_bytes();
    let mut at = skip_ws(bytes, start);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(bytes, at + 1);
    let mut raw = RawEvent::default();
    if bytes.get(at) == Some(&b'}') {
        return Some((raw, at + 1));
    }
    loop {
        let (key, after_key) = string(text, at)?;
        at = skip_ws(bytes, after_key);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(bytes, at + 1);
        let (value, after_value) = scalar(text, at)?;
        let slot = match key {
            "sensorId" | "sensor_id" => Some(("sensorId", &mut raw.sensor_id)),
            "eventType" | "event_type" => Some(("eventType", &mut raw.event_type)),
            "value" => Some(("value", &mut raw.value)),
            "timestamp" => Some(("timestamp", &mut raw.timestamp)),
            _ => None,
        };
        if let Some((name, slot)) = slot
            && slot.replace(value).is_some()
        {
            raw.duplicate.get_or_insert(name);
        }
        at = skip_ws(bytes, after_value);
        match bytes.get(at) {
            Some(b',') => at = skip_ws(bytes, at + 1),
            Some(b'}') => return Some((raw, at + 1)),
            _ => return None,
        }
    }
}

/// The whole of `text` is one object (surrounding whitespace allowed).
pub(super) fn whole_object(text: &str) -> Option<RawEvent<'_>> {
    let (raw, end) = object(text, 0)?;
    (skip_ws(text.as_bytes(), end) == text.len()).then_some(raw)
}

/// Every element of a JSON array of objects, or `None`.
pub(super) fn array(text: &str) -> Option<Vec<(RawEvent<'_>, std::ops::Range<usize>)>> {
    let bytes = text.as_bytes();
    let mut at = skip_ws(bytes, 0);
    if bytes.get(at) != Some(&b'[') {
        return None;
    }
    at = skip_ws(bytes, at + 1);
    let mut elements = Vec::with_capacity(text.len() / 96 + 1);
    if bytes.get(at) == Some(&b']') {
        return (skip_ws(bytes, at + 1) == bytes.len()).then_some(elements);
    }
    loop {
        let begin = at;
        let (raw, end) = object(text, at)?;
        elements.push((raw, begin..end));
        at = skip_ws(bytes, end);
        match bytes.get(at) {
            Some(b',') => at = skip_ws(bytes, at + 1),
            Some(b']') => return (skip_ws(bytes, at + 1) == bytes.len()).then_some(elements),
            _ => return None,
        }
    }
}

#[inline]
fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// A string without escapes or control characters starting at `at` (on its quote).
#[inline]
fn string(text: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let body = at + 1;
    let length = memchr::memchr2(b'"', b'\\', &bytes[body..])?;
    let end = body + length;
    if bytes[end] != b'"' || bytes[body..end].iter().any(|&b| b < 0x20) {
        return None;
    }
    // `text` is valid UTF-8 and quotes are ASCII, so these are character boundaries.
    Some((&text[body..end], end + 1))
}

#[inline]
fn scalar(text: &str, at: usize) -> Option<(Scalar<'_>, usize)> {
    let bytes = text.as_bytes();
    match *bytes.get(at)? {
        b'"' => string(text, at).map(|(s, end)| (Scalar::Str(Cow::Borrowed(s)), end)),
        b'-' | b'0'..=b'9' => number(text, at),
        b't' => literal(bytes, at, b"true").map(|end| (Scalar::Bool(true), end)),
        b'f' => literal(bytes, at, b"false").map(|end| (Scalar::Bool(false), end)),
        b'n' => literal(bytes, at, b"null").map(|end| (Scalar::Null, end)),
        _ => None,
    }
}

#[inline]
fn literal(bytes: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    (bytes.get(at..at + word.len()) == Some(word)).then_some(at + word.len())
}

/// A JSON number read the way serde_json reads it: integers as `u64` (or `i64` when
/// negative), anything with a fraction or an exponent as the correctly rounded `f64`.
/// Integers that do not fit, and floats out of range, are left to serde.
#[inline]
fn number(text: &str, at: usize) -> Option<(Scalar<'_>, usize)> {
    let bytes = text.as_bytes();
    let mut end = at;
    let negative = bytes[end] == b'-';
    if negative {
        end += 1;
    }
    match bytes.get(end)? {
        b'0' => end += 1,
        b'1'..=b'9' => {
            while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
        }
        _ => return None,
    }
    let mut float = false;
    if bytes.get(end) == Some(&b'.') {
        float = true;
        end += 1;
        let digits = end;
        while bytes.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == digits {
            return None;
        }
    }
    if let Some(b'e' | b'E') = bytes.get(end) {
        float = true;
        end += 1;
        if let Some(b'+' | b'-') = bytes.get(end) {
            end += 1;
        }
        let digits = end;
        while bytes.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == digits {
            return None;
        }
    }
    // A number runs into the next token only through a delimiter.
    if bytes.get(end).is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
        return None;
    }
    let literal = &text[at..end];
    let value = if float {
        let value: f64 = literal.parse().ok()?;
        if !value.is_finite() {
            return None;
        }
        Scalar::Float(value)
    } else if negative {
        match literal.parse().ok()? {
            // serde_json reads -0 as the float -0.0.
            0 => Scalar::Float(-0.0),
            value => Scalar::Int(value),
        }
    } else {
        Scalar::UInt(literal.parse().ok()?)
    };
    Some((value, end))
}
