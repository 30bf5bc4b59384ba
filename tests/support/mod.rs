//! Shared test support.
pub mod nats;
pub mod pg;
pub mod replication;
pub mod daemon;
pub mod killable;
