//! Sources other than HTTP ingestion (which is part of the gateway): Kafka and MQTT.

pub mod kafka;
pub mod mqtt;
