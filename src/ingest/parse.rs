//! Parsing request bodies (one JSON object, a JSON array, or NDJSON) into events.
//!
//! Every event is validated on its own: a bad element is rejected with its index, the
//! field and the reason, and the rest of the body is still accepted. The decoder visits
//! fields itself instead of deriving `Deserialize`, so a wrong type names its field and
//! no intermediate `serde_json::Value` is built on the hot path.

use std::borrow::Cow;
use std::fmt;

use compact_str::CompactString;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::messages::{Event, RejectReason, truncate_payload};

/// Largest epoch-millisecond timestamp accepted (9998-12-31T23:59:59.999Z): a year
/// short of RFC 3339's last instant, so the end of any window (a year at most) still
/// has a four-digit year.
pub const MAX_TIMESTAMP_MS: i64 = 253_370_764_799_999;

#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    pub max_string_bytes: usize,
    /// Events stamped further than this ahead of the ingest clock are rejected
    /// (`clock_skew`); `None`: no check.
    pub max_future_skew_ms: Option<i64>,
}

impl ParseLimits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_string_bytes: config.ingest.max_string_bytes,
            max_future_skew_ms: (!config.pipeline.max_future_skew.is_zero())
                .then(|| i64::try_from(config.pipeline.max_future_skew.as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

/// Largest accepted magnitude of `value`: every aggregate (sums, Welford's squared
/// deviations over up to 2^32 events) and every model's arithmetic stays finite below it.
pub const MAX_ABS_VALUE: f64 = 1e100;

impl Default for ParseLimits {
    fn default() -> Self {
        Self { max_string_bytes: 256, max_future_skew_ms: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON object or an array of them (falls back to NDJSON when a body holds
    /// several objects separated by newlines).
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl BodyFormat {
    /// The format a `Content-Type` header announces.
    /// The body format a `Content-Type` names; `None` for anything but JSON and NDJSON
    /// (a browser's cross-origin `text/plain` or form POST among them).
    pub fn from_content_type(content_type: Option<&str>) -> Option<Self> {
        let mime = content_type?.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match mime.as_str() {
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/jsonlines" => Some(Self::Ndjson),
            "application/json" => Some(Self::Json),
            other if other.starts_with("application/") && other.ends_with("+json") => Some(Self::Json),
            _ => None,
        }
    }
}

/// A rejected element of a body.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// 0-based index in the array, or 0-based line number for NDJSON.
    pub index: usize,
    pub field: Option<&'static str>,
    pub reason: RejectReason,
    /// Names the field and the reason, e.g. `value: expected a number, found string`.
    pub message: String,
    /// The element's text (truncated), for the dead-letter store.
    pub raw: String,
    pub sensor_id: Option<CompactString>,
    /// The event time, when it was read (a `clock_skew` rejection carries it).
    pub event_time_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<Event>,
    pub rejected: Vec<Rejection>,
}

/// The body as a whole could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BodyError {
    #[error("body is not valid UTF-8 (byte {0})")]
    NotUtf8(usize),
    #[error("body is empty")]
    Empty,
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body must be a JSON object, an array of objects, or NDJSON")]
    NotObjectOrArray,
}

/// A field-level validation failure.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: Option<&'static str>,
    pub reason: RejectReason,
    pub message: String,
    pub event_time_ms: Option<i64>,
}

impl FieldError {
    fn new(field: &'static str, reason: RejectReason, message: impl fmt::Display) -> Self {
        Self { field: Some(field), reason, message: format!("{field}: {message}"), event_time_ms: None }
    }
}

/// Parse a request body. `now_ms` is the ingestion time (also the event time of events
/// without a timestamp). Positions are left at 0; the router assigns them.
pub fn parse_body(body: &[u8], format: BodyFormat, limits: ParseLimits, now_ms: i64) -> Result<Parsed, BodyError> {
    let text = std::str::from_utf8(body).map_err(|error| BodyError::NotUtf8(error.valid_up_to()))?;
    match format {
        BodyFormat::Ndjson => Ok(parse_ndjson(text, limits, now_ms)),
        BodyFormat::Json => parse_json(text, limits, now_ms),
    }
}

/// Parse a message that must hold exactly one event object (a Kafka or MQTT message).
/// A rejection carries the reason and a message naming the field.
pub fn parse_event(payload: &[u8], limits: ParseLimits, now_ms: i64) -> Result<Event, (RejectReason, String)> {
    parse_event_with(payload, limits, now_ms, Implied::default())
}

/// Fields a message's envelope names (an MQTT topic such as `sensors/{sensorId}/data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Implied<'a> {
    pub sensor_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
}

/// [`parse_event`] for a message whose envelope names some fields: the payload may leave
/// them out (a field given in both must agree), and when the envelope names the sensor
/// and the event type the payload may be a bare number, stamped with `now_ms`.
pub fn parse_event_with(
    payload: &[u8],
    limits: ParseLimits,
    now_ms: i64,
    implied: Implied<'_>,
) -> Result<Event, (RejectReason, String)> {
    let text = std::str::from_utf8(payload).map_err(|error| {
        (RejectReason::Unparsable, format!("message is not valid UTF-8 (byte {})", error.valid_up_to()))
    })?;
    let trimmed = text.trim();
    match trimmed.as_bytes().first() {
        None => Err((RejectReason::Unparsable, "message is empty".to_string())),
        Some(b'{') => {
            match super::fast::whole_object(trimmed).map_or_else(|| serde_json::from_str::<RawEvent>(trimmed), Ok) {
                Ok(mut raw) => {
                    fill("sensorId", &mut raw.sensor_id, implied.sensor_id)?;
                    fill("eventType", &mut raw.event_type, implied.event_type)?;
                    raw.validate(limits, now_ms).map_err(|error| (error.reason, error.message))
                }
                Err(error) => Err(match field_error_from_json(&error) {
                    Some(field_error) => (field_error.reason, field_error.message),
                    None => (RejectReason::Unparsable, format!("unparsable: {error}")),
                }),
            }
        }
        Some(b'[') => {
            Err((RejectReason::InvalidValue, "a message must hold exactly one event object, not an array".to_string()))
        }
        Some(b'0'..=b'9' | b'-' | b'+' | b'.') => bare_number(trimmed, limits, now_ms, implied),
        Some(_) => Err((RejectReason::Unparsable, "a message must hold one JSON event object".to_string())),
    }
}

/// A field the envelope names: fills the payload's gap, or must equal what it holds.
fn fill<'a>(
    field: &'static str,
    slot: &mut Option<Scalar<'a>>,
    implied: Option<&'a str>,
) -> Result<(), (RejectReason, String)> {
    let Some(implied) = implied else {
        return Ok(());
    };
    match slot {
        None | Some(Scalar::Null) => {
            *slot = Some(Scalar::Str(std::borrow::Cow::Borrowed(implied)));
            Ok(())
        }
        Some(Scalar::Str(given)) if given.as_ref() == implied => Ok(()),
        Some(Scalar::Str(given)) => {
            Err((RejectReason::InvalidValue, format!("{field}: {given:?} in the message, {implied:?} in the topic")))
        }
        // The payload's own type error names the field.
        Some(_) => Ok(()),
    }
}

/// A payload that is only a number: the reading of the sensor and type the envelope names.
fn bare_number(
    text: &str,
    limits: ParseLimits,
    now_ms: i64,
    implied: Implied<'_>,
) -> Result<Event, (RejectReason, String)> {
    let (Some(sensor_id), Some(event_type)) = (implied.sensor_id, implied.event_type) else {
        return Err((
            RejectReason::MissingField,
            "a bare number needs a topic pattern that names {sensorId} and {eventType}; send an event object \
             otherwise"
                .to_string(),
        ));
    };
    let parsed: f64 = text.parse().map_err(|_| (RejectReason::Unparsable, format!("not a number: {text:?}")))?;
    let raw = RawEvent {
        sensor_id: Some(Scalar::Str(std::borrow::Cow::Borrowed(sensor_id))),
        event_type: Some(Scalar::Str(std::borrow::Cow::Borrowed(event_type))),
        value: Some(Scalar::Float(parsed)),
        ..RawEvent::default()
    };
    raw.validate(limits, now_ms).map_err(|error| (error.reason, error.message))
}

fn parse_json(text: &str, limits: ParseLimits, now_ms: i64) -> Result<Parsed, BodyError> {
    let trimmed = text.trim_start();
    match trimmed.as_bytes().first() {
        None => Err(BodyError::Empty),
        Some(b'{') => {
            match super::fast::whole_object(trimmed).map_or_else(|| serde_json::from_str::<RawEvent>(trimmed), Ok) {
                Ok(raw) => {
                    let mut parsed = Parsed::default();
                    push_validated(&mut parsed, 0, raw, limits, now_ms, || text.to_string());
                    Ok(parsed)
                }
                // Several objects, one per line, sent without the NDJSON content type.
                Err(error) if error.to_string().starts_with("trailing characters") && trimmed.contains('\n') => {
                    Ok(parse_ndjson(text, limits, now_ms))
                }
                Err(error) => match field_error_from_json(&error) {
                    Some(field_error) => {
                        Ok(Parsed { events: Vec::new(), rejected: vec![rejection(0, field_error, text, None)] })
                    }
                    None => Err(BodyError::InvalidJson(error.to_string())),
                },
            }
        }
        Some(b'[') => parse_array(trimmed, limits, now_ms),
        Some(_) => Err(BodyError::NotObjectOrArray),
    }
}

fn parse_array(text: &str, limits: ParseLimits, now_ms: i64) -> Result<Parsed, BodyError> {
    if let Some(elements) = super::fast::array(text) {
        let mut parsed = Parsed { events: Vec::with_capacity(elements.len()), rejected: Vec::new() };
        for (index, (raw, range)) in elements.into_iter().enumerate() {
            push_validated(&mut parsed, index, raw, limits, now_ms, || text[range].to_string());
        }
        return Ok(parsed);
    }
    // Serde path: decode every element in one pass. Elements only fail here on JSON syntax
    // (or a number out of f64 range), which the slow path below sorts out per element.
    if let Ok(raws) = serde_json::from_str::<Vec<RawEvent>>(text) {
        let mut parsed = Parsed { events: Vec::with_capacity(raws.len()), rejected: Vec::new() };
        let mut raw_texts: Option<Vec<&RawValue>> = None;
        for (index, raw) in raws.into_iter().enumerate() {
            push_validated(&mut parsed, index, raw, limits, now_ms, || {
                // Only rejected elements need their text: re-read the array lazily.
                let texts = raw_texts.get_or_insert_with(|| serde_json::from_str(text).unwrap_or_default());
                texts.get(index).map(|raw| raw.get().to_string()).unwrap_or_default()
            });
        }
        return Ok(parsed);
    }
    let elements: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|error| BodyError::InvalidJson(error.to_string()))?;
    let mut parsed = Parsed::default();
    for (index, element) in elements.into_iter().enumerate() {
        parse_one(&mut parsed, index, element.get(), limits, now_ms);
    }
    Ok(parsed)
}

fn parse_ndjson(text: &str, limits: ParseLimits, now_ms: i64) -> Parsed {
    let mut parsed = Parsed { events: Vec::with_capacity(text.len() / 96 + 1), rejected: Vec::new() };
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        parse_one(&mut parsed, index, line, limits, now_ms);
    }
    parsed
}

/// Parse and validate one element's text.
fn parse_one(parsed: &mut Parsed, index: usize, text: &str, limits: ParseLimits, now_ms: i64) {
    if let Some(raw) = super::fast::whole_object(text) {
        push_validated(parsed, index, raw, limits, now_ms, || text.to_string());
        return;
    }
    match serde_json::from_str::<RawEvent>(text) {
        Ok(raw) => push_validated(parsed, index, raw, limits, now_ms, || text.to_string()),
        Err(error) => {
            let field_error = field_error_from_json(&error).unwrap_or_else(|| FieldError {
                field: None,
                reason: RejectReason::Unparsable,
                message: format!("unparsable: {error}"),
                event_time_ms: None,
            });
            parsed.rejected.push(rejection(index, field_error, text, None));
        }
    }
}

fn push_validated(
    parsed: &mut Parsed,
    index: usize,
    raw: RawEvent<'_>,
    limits: ParseLimits,
    now_ms: i64,
    raw_text: impl FnOnce() -> String,
) {
    match raw.validate(limits, now_ms) {
        Ok(event) => parsed.events.push(event),
        Err(field_error) => {
            let sensor_id = raw.sensor_id_hint();
            let text = raw_text();
            parsed.rejected.push(rejection(index, field_error, &text, sensor_id));
        }
    }
}

fn rejection(index: usize, error: FieldError, raw: &str, sensor_id: Option<CompactString>) -> Rejection {
    Rejection {
        index,
        field: error.field,
        reason: error.reason,
        message: error.message,
        raw: truncate_payload(raw, crate::messages::MAX_DEAD_LETTER_PAYLOAD),
        sensor_id,
        event_time_ms: error.event_time_ms,
    }
}

/// A number too large for an f64 is a JSON error in serde_json, but for us it is a
/// non-finite value of one field (named by `FieldSeed`), not a broken body.
fn field_error_from_json(error: &serde_json::Error) -> Option<FieldError> {
    let text = error.to_string();
    let (field, rest) = text.split_once(": ")?;
    let field = FIELDS.iter().find(|(name, _)| *name == field).map(|(_, canonical)| *canonical)?;
    rest.starts_with("number out of range").then(|| FieldError {
        field: Some(field),
        reason: RejectReason::NonFinite,
        message: format!("{field}: non-finite value ({rest})"),
        event_time_ms: None,
    })
}

/// Accepted spellings of each field and the canonical name errors use.
const FIELDS: [(&str, &str); 6] = [
    ("sensorId", "sensorId"),
    ("sensor_id", "sensorId"),
    ("eventType", "eventType"),
    ("event_type", "eventType"),
    ("value", "value"),
    ("timestamp", "timestamp"),
];

/// A JSON value as far as validation needs to know it.
#[derive(Debug, PartialEq)]
pub(super) enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Str(_) => "string",
            Self::Int(_) | Self::UInt(_) | Self::Float(_) => "number",
            Self::Bool(_) => "boolean",
            Self::Null => "null",
            Self::Array => "array",
            Self::Object => "object",
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::UInt(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Object)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// The fields of one element, before validation. Unknown fields are ignored so
/// producers can send extra attributes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct RawEvent<'a> {
    pub(super) sensor_id: Option<Scalar<'a>>,
    pub(super) event_type: Option<Scalar<'a>>,
    pub(super) value: Option<Scalar<'a>>,
    pub(super) timestamp: Option<Scalar<'a>>,
    pub(super) duplicate: Option<&'static str>,
    /// Set when the element is not a JSON object (its kind).
    not_an_object: Option<&'static str>,
}

impl<'de> Deserialize<'de> for RawEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawEventVisitor)
    }
}

struct RawEventVisitor;

/// Reads one field's value; a JSON error inside it is prefixed with the field's name.
struct FieldSeed(&'static str);

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Scalar<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Scalar::deserialize(deserializer).map_err(|error| {
            // The outer error gets the position again; keep it once.
            let text = error.to_string();
            let message = text.rfind(" at line ").map_or(text.as_str(), |at| &text[..at]);
            de::Error::custom(format_args!("{}: {message}", self.0))
        })
    }
}

impl<'de> Visitor<'de> for RawEventVisitor {
    type Value = RawEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = RawEvent::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "sensorId" | "sensor_id" => Some(("sensorId", &mut raw.sensor_id)),
                "eventType" | "event_type" => Some(("eventType", &mut raw.event_type)),
                "value" => Some(("value", &mut raw.value)),
                "timestamp" => Some(("timestamp", &mut raw.timestamp)),
                _ => None,
            };
            match slot {
                Some((name, slot)) => {
                    let value = map.next_value_seed(FieldSeed(name))?;
                    if slot.replace(value).is_some() {
                        raw.duplicate.get_or_insert(name);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawEvent::not_object("array"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("string"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("number"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(RawEvent::not_object("null"))
    }
}

impl<'a> RawEvent<'a> {
    fn not_object(kind: &'static str) -> Self {
        Self { not_an_object: Some(kind), ..Self::default() }
    }

    fn sensor_id_hint(&self) -> Option<CompactString> {
        match &self.sensor_id {
            Some(Scalar::Str(text)) if !text.is_empty() && text.len() <= 256 => {
                Some(CompactString::from(text.as_ref()))
            }
            _ => None,
        }
    }

    fn validate(&self, limits: ParseLimits, now_ms: i64) -> Result<Event, FieldError> {
        if let Some(kind) = self.not_an_object {
            return Err(FieldError {
                field: None,
                reason: RejectReason::WrongType,
                message: format!("event: expected a JSON object, found {kind}"),
                event_time_ms: None,
            });
        }
        if let Some(field) = self.duplicate {
            return Err(FieldError::new(
                field,
                RejectReason::InvalidValue,
                "given more than once (camelCase and snake_case spellings count as one field)",
            ));
        }
        let sensor_id = required_string("sensorId", self.sensor_id.as_ref(), limits)?;
        let event_type = required_string("eventType", self.event_type.as_ref(), limits)?;
        let value = number("value", self.value.as_ref())?;
        let timestamp_ms = timestamp("timestamp", self.timestamp.as_ref(), now_ms)?;
        if let Some(skew) = limits.max_future_skew_ms
            && timestamp_ms > now_ms.saturating_add(skew)
        {
            let mut error = FieldError::new(
                "timestamp",
                RejectReason::ClockSkew,
                format_args!(
                    "{} is {} ahead of tidemark's clock, more than pipeline.max_future_skew ({}); check the sensor's \
                     clock",
                    crate::store::ser::rfc3339(timestamp_ms),
                    humantime::format_duration(std::time::Duration::from_secs(
                        u64::try_from((timestamp_ms - now_ms) / 1000).unwrap_or(0)
                    )),
                    humantime::format_duration(std::time::Duration::from_millis(u64::try_from(skew).unwrap_or(0))),
                ),
            );
            error.event_time_ms = Some(timestamp_ms);
            return Err(error);
        }
        Ok(Event { sensor_id, event_type, value, timestamp_ms, ingest_ms: now_ms, position: 0 })
    }
}

fn required_string(
    field: &'static str,
    value: Option<&Scalar<'_>>,
    limits: ParseLimits,
) -> Result<CompactString, FieldError> {
    match value {
        None | Some(Scalar::Null) => Err(FieldError::new(field, RejectReason::MissingField, "missing")),
        Some(Scalar::Str(text)) => {
            if text.is_empty() {
                Err(FieldError::new(field, RejectReason::InvalidValue, "must not be empty"))
            } else if text.len() > limits.max_string_bytes {
                Err(FieldError::new(
                    field,
                    RejectReason::Oversize,
                    format_args!("{} bytes, longer than the limit of {}", text.len(), limits.max_string_bytes),
                ))
            } else if has_control_character(text) {
                Err(FieldError::new(field, RejectReason::InvalidValue, "must not contain control characters"))
            } else if let Some(c) = invisible_character(text) {
                Err(FieldError::new(
                    field,
                    RejectReason::InvalidValue,
                    format_args!(
                        "must not contain invisible or bidirectional formatting characters (U+{:04X})",
                        u32::from(c)
                    ),
                ))
            } else {
                Ok(CompactString::from(text.as_ref()))
            }
        }
        Some(other) => Err(FieldError::new(
            field,
            RejectReason::WrongType,
            format_args!("expected a string, found {}", other.kind()),
        )),
    }
}

/// Whether `text` holds a Unicode control character (C0, DEL or C1), checked on bytes:
/// C1 controls U+0080..U+009F are encoded as 0xC2 0x80..0x9F in UTF-8.
fn has_control_character(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20 || b == 0x7f || (b == 0xc2 && bytes.get(i + 1).is_some_and(|&next| (0x80..=0x9f).contains(&next)))
    })
}

/// The first character of `text` that renders as nothing or reorders what follows:
/// zero-width and bidirectional formatting characters (Unicode category Cf as far as
/// identifiers meet it). Two ids that look the same must be the same id.
fn invisible_character(text: &str) -> Option<char> {
    if text.is_ascii() {
        return None;
    }
    text.chars().find(|&c| {
        matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
    })
}

fn number(field: &'static str, value: Option<&Scalar<'_>>) -> Result<f64, FieldError> {
    match value {
        None | Some(Scalar::Null) => Err(FieldError::new(field, RejectReason::MissingField, "missing")),
        Some(Scalar::Float(v)) if v.is_finite() && v.abs() <= MAX_ABS_VALUE => Ok(*v),
        Some(Scalar::Float(v)) if v.is_finite() => Err(FieldError::new(
            field,
            RejectReason::InvalidValue,
            format_args!("{v:e} is larger in magnitude than {MAX_ABS_VALUE:e}, the largest accepted value"),
        )),
        Some(Scalar::Float(v)) => {
            Err(FieldError::new(field, RejectReason::NonFinite, format_args!("non-finite number {v}")))
        }
        Some(Scalar::Int(v)) => Ok(*v as f64),
        Some(Scalar::UInt(v)) => Ok(*v as f64),
        Some(Scalar::Str(text)) => {
            let lowered = text.trim().to_ascii_lowercase();
            let lowered = lowered.trim_start_matches(['+', '-']);
            if matches!(lowered, "nan" | "inf" | "infinity") {
                Err(FieldError::new(field, RejectReason::NonFinite, format_args!("non-finite number {text:?}")))
            } else {
                Err(FieldError::new(field, RejectReason::WrongType, "expected a number, found string"))
            }
        }
        Some(other) => Err(FieldError::new(
            field,
            RejectReason::WrongType,
            format_args!("expected a number, found {}", other.kind()),
        )),
    }
}

fn timestamp(field: &'static str, value: Option<&Scalar<'_>>, now_ms: i64) -> Result<i64, FieldError> {
    let millis = match value {
        None | Some(Scalar::Null) => return Ok(now_ms),
        Some(Scalar::Int(v)) => *v,
        Some(Scalar::UInt(v)) => i64::try_from(*v).unwrap_or(i64::MAX),
        Some(Scalar::Float(v)) if v.is_finite() => v.floor() as i64,
        Some(Scalar::Float(v)) => {
            return Err(FieldError::new(field, RejectReason::NonFinite, format_args!("non-finite number {v}")));
        }
        Some(Scalar::Str(text)) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) => time.timestamp_millis(),
            Err(error) => {
                return Err(FieldError::new(
                    field,
                    RejectReason::InvalidTimestamp,
                    format_args!(
                        "{text:?} is not RFC 3339 ({error}); send e.g. \"2026-01-31T12:00:00Z\" or epoch milliseconds"
                    ),
                ));
            }
        },
        Some(other) => {
            return Err(FieldError::new(
                field,
                RejectReason::WrongType,
                format_args!("expected an RFC 3339 string or epoch milliseconds, found {}", other.kind()),
            ));
        }
    };
    if !(0..=MAX_TIMESTAMP_MS).contains(&millis) {
        return Err(FieldError::new(
            field,
            RejectReason::InvalidTimestamp,
            format_args!("{millis} is outside 1970-01-01 .. 9998-12-31 (epoch milliseconds)"),
        ));
    }
    Ok(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn json(body: &str) -> Parsed {
        parse_body(body.as_bytes(), BodyFormat::Json, ParseLimits::default(), NOW).expect("parses")
    }

    fn ndjson(body: &str) -> Parsed {
        parse_body(body.as_bytes(), BodyFormat::Ndjson, ParseLimits::default(), NOW).expect("parses")
    }

    #[test]
    fn single_object_camel_and_snake_case() {
        let parsed = json(r#"{"sensorId":"s-1","eventType":"temperature","value":21.5,"timestamp":1700000000123}"#);
        assert_eq!(parsed.events.len(), 1);
        let event = &parsed.events[0];
        assert_eq!(event.sensor_id, "s-1");
        assert_eq!(event.event_type, "temperature");
        assert_eq!(event.value, 21.5);
        assert_eq!(event.timestamp_ms, 1_700_000_000_123);
        assert_eq!(event.ingest_ms, NOW);

        let parsed = json(r#"{"sensor_id":"s-2","event_type":"humidity","value":3,"unit":"%"}"#);
        assert_eq!(parsed.events[0].sensor_id, "s-2");
        assert_eq!(parsed.events[0].value, 3.0);
        assert_eq!(parsed.events[0].timestamp_ms, NOW, "missing timestamp means ingestion time");
    }

    #[test]
    fn rfc3339_timestamps() {
        let parsed = json(r#"{"sensorId":"s","eventType":"t","value":1,"timestamp":"2023-11-14T22:13:20.5+01:00"}"#);
        assert_eq!(parsed.events[0].timestamp_ms, 1_699_996_400_500);
        let parsed = json(r#"{"sensorId":"s","eventType":"t","value":1,"timestamp":"yesterday"}"#);
        assert_eq!(parsed.rejected[0].reason, RejectReason::InvalidTimestamp);
        assert!(parsed.rejected[0].message.starts_with("timestamp:"));
    }

    #[test]
    fn array_keeps_good_elements_and_names_bad_ones() {
        let parsed = json(
            r#"[
              {"sensorId":"a","eventType":"t","value":1},
              {"eventType":"t","value":1},
              {"sensorId":"c","eventType":"t","value":"hot"},
              {"sensorId":"d","eventType":"t","value":1e999},
              {"sensorId":"e","eventType":"t","value":"NaN"},
              42,
              {"sensorId":"g","eventType":"t","value":2}
            ]"#,
        );
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(parsed.events[1].sensor_id, "g");
        let reasons: Vec<_> = parsed.rejected.iter().map(|r| (r.index, r.reason, r.field)).collect();
        assert_eq!(
            reasons,
            vec![
                (1, RejectReason::MissingField, Some("sensorId")),
                (2, RejectReason::WrongType, Some("value")),
                (3, RejectReason::NonFinite, Some("value")),
                (4, RejectReason::NonFinite, Some("value")),
                (5, RejectReason::WrongType, None),
            ]
        );
        assert!(parsed.rejected[1].message.contains("expected a number, found string"), "{:?}", parsed.rejected[1]);
        assert!(parsed.rejected[0].raw.contains("\"eventType\""), "raw text kept: {:?}", parsed.rejected[0].raw);
        assert_eq!(parsed.rejected[1].sensor_id.as_deref(), Some("c"));
    }

    #[test]
    fn ndjson_lines_are_independent() {
        let body = "{\"sensorId\":\"a\",\"eventType\":\"t\",\"value\":1}\r\n\n{not json}\n{\"sensorId\":\"b\",\"eventType\":\"t\",\"value\":2}\n";
        let parsed = ndjson(body);
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(parsed.rejected.len(), 1);
        assert_eq!(parsed.rejected[0].index, 2, "index is the line number");
        assert_eq!(parsed.rejected[0].reason, RejectReason::Unparsable);
        assert_eq!(parsed.rejected[0].raw, "{not json}");
    }

    #[test]
    fn newline_separated_objects_without_ndjson_content_type() {
        let parsed = json(
            "{\"sensorId\":\"a\",\"eventType\":\"t\",\"value\":1}\n{\"sensorId\":\"b\",\"eventType\":\"t\",\"value\":2}",
        );
        assert_eq!(parsed.events.len(), 2);
    }

    #[test]
    fn oversize_empty_and_duplicate_fields() {
        let long = "x".repeat(300);
        let parsed = json(&format!(r#"{{"sensorId":"{long}","eventType":"t","value":1}}"#));
        assert_eq!(parsed.rejected[0].reason, RejectReason::Oversize);
        assert!(parsed.rejected[0].message.contains("300 bytes"));
        let parsed = json(r#"{"sensorId":"","eventType":"t","value":1}"#);
        assert_eq!(parsed.rejected[0].reason, RejectReason::InvalidValue);
        let parsed = json(r#"{"sensorId":"a","sensor_id":"b","eventType":"t","value":1}"#);
        assert_eq!(parsed.rejected[0].field, Some("sensorId"));
    }

    #[test]
    fn timestamps_out_of_range_are_rejected() {
        let parsed = json(r#"{"sensorId":"a","eventType":"t","value":1,"timestamp":-5}"#);
        assert_eq!(parsed.rejected[0].reason, RejectReason::InvalidTimestamp);
        let parsed = json(r#"{"sensorId":"a","eventType":"t","value":1,"timestamp":true}"#);
        assert_eq!(parsed.rejected[0].reason, RejectReason::WrongType);
    }

    #[test]
    fn whole_body_errors() {
        let limits = ParseLimits::default();
        assert_eq!(parse_body(b"", BodyFormat::Json, limits, NOW).unwrap_err(), BodyError::Empty);
        assert_eq!(parse_body(b"42", BodyFormat::Json, limits, NOW).unwrap_err(), BodyError::NotObjectOrArray);
        assert!(matches!(parse_body(b"[{", BodyFormat::Json, limits, NOW).unwrap_err(), BodyError::InvalidJson(_)));
        assert!(matches!(
            parse_body(b"{\"a\":", BodyFormat::Json, limits, NOW).unwrap_err(),
            BodyError::InvalidJson(_)
        ));
        assert!(matches!(parse_body(&[0xff, 0xfe], BodyFormat::Json, limits, NOW).unwrap_err(), BodyError::NotUtf8(0)));
    }

    #[test]
    fn invisible_and_bidi_characters_are_rejected_in_ids() {
        for c in ['\u{200B}', '\u{200D}', '\u{202E}', '\u{2066}', '\u{FEFF}', '\u{00AD}', '\u{E0041}'] {
            let body = format!(r#"{{"sensorId":"s{c}1","eventType":"t","value":1}}"#);
            let parsed = json(&body);
            assert_eq!(parsed.rejected.len(), 1, "{c:?}");
            assert!(parsed.rejected[0].message.contains("sensorId"), "{}", parsed.rejected[0].message);
        }
        for id in ["capteur-été", "датчик", "センサー", "s-1"] {
            let body = format!(r#"{{"sensorId":"{id}","eventType":"t","value":1}}"#);
            assert_eq!(json(&body).events.len(), 1, "{id}");
        }
        let parsed = json(r#"{"sensorId":"a","eventType":"t","value":1,"timestamp":"9999-12-31T23:59:59Z"}"#);
        assert_eq!(parsed.rejected[0].reason, RejectReason::InvalidTimestamp, "a window end would leave RFC 3339");
    }

    #[test]
    fn control_characters_match_char_is_control() {
        for c in ['\u{0}', '\n', '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}', 'a', 'é', '\u{a0}', '€', '\u{2028}'] {
            let text = format!("x{c}y");
            assert_eq!(has_control_character(&text), text.chars().any(char::is_control), "{c:?}");
        }
    }

    #[test]
    fn the_fast_path_takes_the_common_shape() {
        let text = r#"{"sensorId":"sensor-0001","eventType":"temperature","value":21.5,"timestamp":1767225600000}"#;
        let raw = crate::ingest::fast::whole_object(text).expect("fast path");
        assert_eq!(raw, serde_json::from_str::<RawEvent>(text).expect("serde"));
        for declined in [r#"{"sensorId":"a\u0062"}"#, r#"{"value":[1]}"#, r#"{"value":1e999}"#, r#"{"a":1} x"#] {
            assert!(crate::ingest::fast::whole_object(declined).is_none(), "{declined}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/x-ndjson; charset=utf-8")),
            Some(BodyFormat::Ndjson)
        );
        assert_eq!(BodyFormat::from_content_type(Some("application/json")), Some(BodyFormat::Json));
        assert_eq!(BodyFormat::from_content_type(Some("Application/cloudevents+json")), Some(BodyFormat::Json));
        for refused in
            [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data")]
        {
            assert_eq!(BodyFormat::from_content_type(refused), None, "{refused:?}");
        }
    }

    /// Text of one JSON value, chosen to hit both what the fast path takes and what it
    /// must leave to serde (escapes, nesting, big or odd numbers, bad syntax).
    fn value_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-z0-9_-]{0,12}".prop_map(|s| format!("\"{s}\"")),
            "[ -~]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            Just("\"caf\u{e9} \\u00e9\"".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| x.to_string()),
            any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:e}")),
            "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
            Just("1e999".to_string()),
            Just("01".to_string()),
            Just("1.".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("null".to_string()),
            Just("[1,2]".to_string()),
            Just("{\"a\":1}".to_string()),
            Just("nul".to_string()),
        ]
    }

    fn object_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("sensorId"),
            Just("sensor_id"),
            Just("eventType"),
            Just("event_type"),
            Just("value"),
            Just("timestamp"),
            Just("unit"),
            Just("sens\\u006frId"),
        ];
        let ws = prop_oneof![Just(""), Just(" "), Just("\n\t "), Just("\r\n")];
        proptest::collection::vec((key, value_text(), ws.clone()), 0..7).prop_map(|fields| {
            let body: Vec<String> =
                fields.iter().map(|(key, value, ws)| format!("{ws}\"{key}\"{ws}:{ws}{value}{ws}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest::proptest! {
        /// The fast path reads an object exactly as serde does, or leaves it to serde.
        #[test]
        fn fast_path_agrees_with_serde(text in object_text()) {
            let serde = serde_json::from_str::<RawEvent>(&text);
            if let Some(fast) = crate::ingest::fast::whole_object(&text) {
                proptest::prop_assert!(serde.is_ok(), "fast path took what serde refuses: {text}");
                proptest::prop_assert_eq!(Some(fast), serde.ok(), "{}", text);
            }
        }

        /// Arrays: same events and rejections whichever path reads them.
        #[test]
        fn fast_and_serde_arrays_agree(objects in proptest::collection::vec(object_text(), 0..6)) {
            let text = format!("[{}]", objects.join(" ,\n"));
            let fast = crate::ingest::fast::array(&text);
            let serde = serde_json::from_str::<Vec<RawEvent>>(&text);
            if let Some(fast) = fast {
                let fast: Vec<RawEvent> = fast.into_iter().map(|(raw, _)| raw).collect();
                proptest::prop_assert_eq!(Some(fast), serde.ok(), "{}", text);
            }
        }

        /// Whatever bytes arrive, parsing returns (it never panics).
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_body(&body, BodyFormat::Json, ParseLimits::default(), NOW);
            let _ = parse_body(&body, BodyFormat::Ndjson, ParseLimits::default(), NOW);
        }
    }
}
