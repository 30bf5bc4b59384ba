//! Prometheus metrics: a text-format writer and a minimal HTTP endpoint.
//!
//! The endpoint answers `GET /metrics` and nothing else. It is written on
//! tokio directly instead of pulling in hyper and an exporter crate: one route,
//! no keep-alive, no TLS, and the exporter crates want to own the metric
//! registry, while our values already live in the replication status.

mod http;
mod text;

pub use http::serve;
pub use text::{MetricKind, MetricsText};
