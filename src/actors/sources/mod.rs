//! Sources other than HTTP ingestion (which is part of the gateway): Kafka.

pub mod kafka;
