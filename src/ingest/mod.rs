//! Ingestion front: body parsing and validation (pure), shared by HTTP, MQTT and Kafka,
//! and the handles front ends use to hand events in.

mod fast;
pub mod handle;
pub mod log;
pub mod parse;
pub mod sampling;

pub use handle::{Ingest, IngestRefusal, SourceStatus};
pub use parse::{BodyError, BodyFormat, Implied, ParseLimits, Parsed, Rejection, parse_body, parse_event_with};
