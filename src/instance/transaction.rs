//! Interactive transactions: a lease on the worker plus `BEGIN`.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::handoff::Route;
use super::worker::{Job, Output, Request, Shared};
use super::{encode_batch, results, single};
use crate::error::{Error, Result};
use crate::params::{Param, ToParam};
use crate::protocol::{self, TxStatus};
use crate::rows::QueryResult;

/// An open transaction holding its instance exclusively.
///
/// Dropping it without [`commit`](Self::commit) rolls it back (the worker
/// does so as soon as the handle is gone, also if the task was cancelled).
#[derive(Debug)]
pub struct Transaction {
    lease: Route,
    shared: Arc<Shared>,
}

impl Transaction {
    pub(super) async fn begin(lease: mpsc::UnboundedSender<Request>, shared: Arc<Shared>) -> Result<Transaction> {
        let tx = Transaction { lease: Route::Lease(lease), shared };
        tx.exec("BEGIN").await?;
        Ok(tx)
    }

    /// Runs one statement with parameters inside the transaction.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToParam + Sync)]) -> Result<QueryResult> {
        self.query_params(sql, params.iter().map(|p| p.to_param()).collect()).await
    }

    /// [`query`](Self::query) with owned parameters.
    pub async fn query_params(&self, sql: &str, params: Vec<Param>) -> Result<QueryResult> {
        single(self.call(Job::Protocol(encode_batch(&[(sql, params.as_slice())])?)).await?)
    }

    /// Runs several statements with parameters in one round trip, inside the
    /// transaction. The first failing statement stops the batch and puts
    /// the transaction in the failed state.
    pub async fn batch<S: AsRef<str>>(&self, statements: &[(S, Vec<Param>)]) -> Result<Vec<QueryResult>> {
        let statements: Vec<(&str, &[Param])> =
            statements.iter().map(|(sql, params)| (sql.as_ref(), params.as_slice())).collect();
        results(self.call(Job::Protocol(encode_batch(&statements)?)).await?)
    }

    /// Runs a script of statements without parameters inside the transaction.
    pub async fn exec(&self, sql: &str) -> Result<Vec<QueryResult>> {
        let mut bytes = BytesMut::new();
        protocol::simple_query(sql, &mut bytes)?;
        results(self.call(Job::Protocol(bytes)).await?)
    }

    /// [`Instance::copy_in`](crate::Instance::copy_in) inside the transaction.
    pub async fn copy_in(&self, sql: &str, data: Vec<u8>) -> Result<u64> {
        let output = self.call(Job::CopyIn { sql: sql.to_owned(), data }).await?;
        Ok(results(output)?.iter().map(QueryResult::rows_affected).sum())
    }

    /// Commits. If a statement in the transaction failed, PostgreSQL rolls
    /// back instead, and this returns [`Error::RolledBack`].
    pub async fn commit(self) -> Result<()> {
        let mut bytes = BytesMut::new();
        protocol::simple_query("COMMIT", &mut bytes)?;
        let output = self.call(Job::Protocol(bytes)).await?;
        let reply = protocol::decode(&output.bytes)?;
        debug_assert_eq!(reply.status, Some(TxStatus::Idle));
        let tag = reply.results.first().map(|r| r.command.clone());
        reply.into_results()?;
        match tag.as_deref() {
            Some("ROLLBACK") => Err(Error::RolledBack),
            _ => Ok(()),
        }
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<()> {
        self.exec("ROLLBACK").await.map(drop)
    }

    async fn call(&self, job: Job) -> Result<Output> {
        self.lease.call(&self.shared, job).await
    }
}
