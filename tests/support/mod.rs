//! Shared test support.
pub mod daemon;
pub mod nats;
pub mod pg;
pub mod replication;
