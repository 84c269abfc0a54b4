//! The actors: partitions (windows and scoring), sinks, and the HTTP gateway.

pub mod gateway;
pub mod partition;
pub mod sinks;
pub mod sources;
