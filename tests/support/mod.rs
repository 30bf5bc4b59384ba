//! Shared test support.
pub mod daemon;
pub mod pg;
pub mod replication;
