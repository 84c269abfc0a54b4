//! Deterministic sensor simulator and load generator.
