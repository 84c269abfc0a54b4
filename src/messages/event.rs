//! The data that flows through the pipeline: accepted events, window results, dead letters.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// A position in a partition's source: a sequence number of the embedded ingest log, or a
/// Kafka offset. Positions of one partition only grow.
pub type Position = u64;

/// Index of a partition actor (and, in Kafka mode, of the Kafka partition it owns).
pub type PartitionId = u32;

/// A validated sensor reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub sensor_id: CompactString,
    pub event_type: CompactString,
    pub value: f64,
    /// Event time, epoch milliseconds.
    pub timestamp_ms: i64,
    /// When tidemark accepted the event, epoch milliseconds. Drives idle flushing, so a
    /// replay of the same log makes the same decisions.
    pub ingest_ms: i64,
    /// Source position; set by the router (embedded) or taken from Kafka.
    pub position: Position,
}

/// Severity of a window's score, from the score's place above the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Self::Low, Self::Medium, Self::High, Self::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "LOW",
            Self::Medium => "MEDIUM",
            Self::High => "HIGH",
            Self::Critical => "CRITICAL",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|severity| severity.as_str().eq_ignore_ascii_case(text))
    }

    /// Non-anomalous windows are LOW; anomalous ones split the range from the threshold
    /// to 1 in thirds: MEDIUM, HIGH, CRITICAL.
    pub fn from_score(score: f64, threshold: f64) -> Self {
        if score < threshold {
            return Self::Low;
        }
        let span = 1.0 - threshold;
        if span <= 0.0 {
            return Self::Critical;
        }
        let place = (score - threshold) / span;
        if place < 1.0 / 3.0 {
            Self::Medium
        } else if place < 2.0 / 3.0 {
            Self::High
        } else {
            Self::Critical
        }
    }
}

/// A fired window: what the sinks write and the API serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowResult {
    pub sensor_id: CompactString,
    pub event_type: CompactString,
    /// Tumbling, hopping or session: with the start, what the result is keyed by.
    pub window_kind: crate::window::WindowKind,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub event_count: u64,
    pub avg_value: f64,
    pub min_value: f64,
    pub max_value: f64,
    pub stddev: f64,
    pub prediction_score: f64,
    pub anomaly: bool,
    pub severity: Severity,
    /// 0 for the first firing; grows only when a late event updates the window.
    pub revision: u32,
    /// What drove the score, in words.
    pub explanation: String,
    /// Wall-clock time the window fired, epoch milliseconds (for latency measurement).
    pub fired_at_ms: i64,
    /// Session windows: starts of earlier results of the key this one replaces (sessions
    /// a late event merged); the sinks delete them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<i64>,
}

/// Why an event or row ended in the dead-letter store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    MissingField,
    WrongType,
    NonFinite,
    Oversize,
    InvalidValue,
    InvalidTimestamp,
    Unparsable,
    Late,
    Poison,
    StoreRejected,
    /// Kafka offsets that were deleted by the topic's retention before they were read.
    RetentionGap,
    /// Stamped further ahead of the ingest clock than `pipeline.max_future_skew`.
    ClockSkew,
    /// A new key in a partition that already holds `pipeline.max_keys_per_partition`.
    KeyLimit,
    /// A window result Elasticsearch refused for its content.
    ElasticsearchRejected,
}

impl RejectReason {
    pub const ALL: [RejectReason; 14] = [
        Self::MissingField,
        Self::WrongType,
        Self::NonFinite,
        Self::Oversize,
        Self::InvalidValue,
        Self::InvalidTimestamp,
        Self::Unparsable,
        Self::Late,
        Self::Poison,
        Self::StoreRejected,
        Self::RetentionGap,
        Self::ClockSkew,
        Self::KeyLimit,
        Self::ElasticsearchRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::NonFinite => "non_finite",
            Self::Oversize => "oversize",
            Self::InvalidValue => "invalid_value",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::Unparsable => "unparsable",
            Self::Late => "late",
            Self::Poison => "poison",
            Self::StoreRejected => "store_rejected",
            Self::RetentionGap => "retention_gap",
            Self::ClockSkew => "clock_skew",
            Self::KeyLimit => "key_limit",
            Self::ElasticsearchRejected => "elasticsearch_rejected",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }
}

/// Where a dead letter came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Http,
    Mqtt,
    Kafka,
    File,
    Pipeline,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Mqtt => "mqtt",
            Self::Kafka => "kafka",
            Self::File => "file",
            Self::Pipeline => "pipeline",
        }
    }
}

/// Longest payload kept with a dead letter; longer ones are cut (and say so).
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 4096;

/// An input that could not be used, with the reason, kept for inspection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub received_at_ms: i64,
    pub source: Source,
    pub reason: RejectReason,
    pub error: String,
    pub sensor_id: Option<CompactString>,
    pub event_type: Option<CompactString>,
    pub event_time_ms: Option<i64>,
    pub partition: Option<PartitionId>,
    pub position: Option<Position>,
    /// The offending input (truncated to [`MAX_DEAD_LETTER_PAYLOAD`] bytes).
    pub payload: String,
}

impl DeadLetter {
    /// A late or poison event, kept with its parsed fields.
    pub fn for_event(event: &Event, reason: RejectReason, error: String, partition: PartitionId) -> Self {
        let payload = serde_json::json!({
            "sensorId": event.sensor_id.as_str(),
            "eventType": event.event_type.as_str(),
            "value": event.value,
            "timestamp": event.timestamp_ms,
        })
        .to_string();
        Self {
            received_at_ms: event.ingest_ms,
            source: Source::Pipeline,
            reason,
            error,
            sensor_id: Some(event.sensor_id.clone()),
            event_type: Some(event.event_type.clone()),
            event_time_ms: Some(event.timestamp_ms),
            partition: Some(partition),
            position: Some(event.position),
            payload,
        }
    }
}

/// Cut `text` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate_payload(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated, {} bytes]", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_bands() {
        assert_eq!(Severity::from_score(0.1, 0.8), Severity::Low);
        assert_eq!(Severity::from_score(0.79, 0.8), Severity::Low);
        assert_eq!(Severity::from_score(0.8, 0.8), Severity::Medium);
        assert_eq!(Severity::from_score(0.88, 0.8), Severity::High);
        assert_eq!(Severity::from_score(0.99, 0.8), Severity::Critical);
        assert_eq!(Severity::from_score(1.0, 1.0), Severity::Critical);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let text = "é".repeat(10);
        let cut = truncate_payload(&text, 5);
        assert!(cut.starts_with("éé"));
        assert!(cut.contains("truncated"));
        assert_eq!(truncate_payload("short", 10), "short");
    }
}
