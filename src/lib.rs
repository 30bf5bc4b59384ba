//! # pglite-cache
//!
//! Embedded PGlite databases (PostgreSQL 17 compiled to WebAssembly, running
//! inside this process) behind an async, cloneable handle. Each instance has
//! its own worker thread and its own WebAssembly memory: many run side by side,
//! and a crash in one leaves the others untouched.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), pglite_cache::Error> {
//! use pglite_cache::{Instance, InstanceOptions, params};
//!
//! let db = Instance::start(InstanceOptions::in_memory()).await?;
//! db.exec("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL)").await?;
//!
//! // An atomic batch: all statements commit, or none.
//! db.transaction(&[
//!     ("INSERT INTO accounts VALUES ($1, $2)", params![1, 100]),
//!     ("INSERT INTO accounts VALUES ($1, $2)", params![2, 50]),
//! ]).await?;
//!
//! // An interactive transaction has the instance to itself until it ends.
//! let tx = db.begin().await?;
//! tx.query("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&1]).await?;
//! tx.query("UPDATE accounts SET balance = balance + 10 WHERE id = $1", &[&2]).await?;
//! tx.commit().await?;
//!
//! let total = db.query("SELECT sum(balance)::float8 AS total FROM accounts", &[]).await?;
//! assert_eq!(total.rows[0].get::<f64>("total"), 150.0);
//!
//! // Errors are typed and keep the SQLSTATE; the instance keeps serving.
//! let err = db.query("SELECT * FROM missing", &[]).await.unwrap_err();
//! assert_eq!(err.code(), Some(&pglite_cache::SqlState::UNDEFINED_TABLE));
//! db.health_check().await?;
//! db.stop().await?;
//! # Ok(()) }
//! ```

pub mod convert;
mod error;
mod instance;
#[cfg(feature = "local-postgres")]
pub mod local_postgres;
pub mod maintenance;
pub mod oid;
mod params;
pub(crate) mod protocol;
pub mod replication;
mod rows;
pub mod server;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use convert::FromValue;
pub use error::{DbError, Error, Result, SqlState};
pub use instance::{
    DEFAULT_SETTINGS, HEALTH_CHECK_TIMEOUT, Health, Instance, InstanceOptions, RawSession, Registry, RestartPolicy,
    Storage, Transaction,
};
pub use params::{Param, ToParam};
pub use rows::{Column, ColumnIndex, QueryResult, Row};
