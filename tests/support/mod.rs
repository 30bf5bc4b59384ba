//! Shared test support.
pub mod daemon;
pub mod killable;
pub mod pg;
pub mod replication;
