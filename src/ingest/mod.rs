//! Ingestion front: body parsing and validation (pure), shared by HTTP, MQTT and Kafka.

pub mod parse;

pub use parse::{BodyError, BodyFormat, ParseLimits, Parsed, Rejection, parse_body};
