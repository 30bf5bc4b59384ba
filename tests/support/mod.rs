//! Shared test support.
pub mod pg;
pub mod replication;
pub mod daemon;
