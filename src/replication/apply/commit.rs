//! The commit side of the apply: a big transaction's pieces sent while it
//! arrives, merged commits of small ones (group commit), and what follows a
//! local commit (status, lag, subscribers, index changes).

use super::*;

impl Applier {
    /// Sends the buffered statements into the open local transaction,
    /// opening it first if needed.
    pub(super) async fn send_buffered(&mut self) -> Result<(), ReplicationError> {
        // The local transaction opened below follows the commit in flight.
        self.settle_commit().await?;
        let instance = self.instance.clone();
        let pending = self.pending()?;
        if pending.local.is_none() {
            let tx = instance.begin().await?;
            tx.query(APPLY_SETTINGS, &[]).await?;
            pending.local = Some(Arc::new(tx));
        }
        let steps = pending.batch.take_steps();
        if steps.is_empty() {
            return Ok(());
        }
        // Wait for the previous piece, then let this one run while the next
        // is received and decoded.
        let reordered = pending.batch.reordered > 0;
        pending.settle().await.map_err(|e| retry_in_order(e, reordered))?;
        let tx = pending.local.clone().expect("opened above");
        pending.in_flight = Some(tokio::spawn(async move {
            let started = std::time::Instant::now();
            run_steps(&tx, steps).await?;
            Ok(started.elapsed())
        }));
        Ok(())
    }

    /// A remote transaction was received whole. It is committed locally
    /// right away, unless more of the stream is already waiting or a local
    /// commit is in flight: then the next transactions join the same local
    /// transaction (group commit, each remote transaction still
    /// all-or-nothing for readers), up to [`MAX_MERGED`] transactions,
    /// [`MAX_MERGE_DELAY`] (or the commit delay if longer) or the buffer
    /// limit.
    pub(super) async fn commit(&mut self, end_lsn: Lsn, commit_time: i64) -> Result<(), ReplicationError> {
        let max_buffered = self.max_buffered;
        let max_delay = MAX_MERGE_DELAY.max(self.commit_delay);
        let pending = self.pending()?;
        if !pending.open {
            return Err(ReplicationError::fatal("Commit without Begin"));
        }
        pending.open = false;
        if !pending.skip {
            pending.last_end = Some((end_lsn, commit_time));
            pending.done.push(AppliedTransaction {
                commit_lsn: pending.final_lsn,
                end_lsn,
                commit_time: pg_time(commit_time),
                change_count: pending.change_count,
                truncated: pending.change_count > pending.changes.len() as u64,
                changes: std::mem::take(&mut pending.changes),
            });
        }
        let flush_now = pending.local.is_some()
            || pending.done.len() >= MAX_MERGED
            || pending.batch.buffered >= max_buffered
            || pending.batch.step_count() >= MAX_MERGED_STEPS
            || pending.batch.buffered >= MAX_MERGED_BYTES
            || pending.started.elapsed() >= max_delay;
        if flush_now {
            self.start_flush().await?;
        }
        Ok(())
    }

    /// Remote transactions are received whole and wait for a merged commit.
    pub(crate) fn has_deferred(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.open)
    }

    /// Not inside a remote transaction (merged commits may be waiting).
    pub(crate) fn between_transactions(&self) -> bool {
        self.pending.as_ref().is_none_or(|p| !p.open)
    }

    /// Commits the waiting remote transactions in one local transaction
    /// that also stores the last one's end LSN, and waits for it (and for
    /// the commit in flight).
    pub(crate) async fn flush_deferred(&mut self) -> Result<(), ReplicationError> {
        self.start_flush().await?;
        self.settle_commit().await
    }

    /// Starts committing the waiting remote transactions, after the commit
    /// in flight ended: small ones commit in the background
    /// ([`Self::commit_done`], [`Self::settle_commit`]).
    pub(crate) async fn start_flush(&mut self) -> Result<(), ReplicationError> {
        if !self.has_deferred() {
            return Ok(());
        }
        self.settle_commit().await?;
        let pending = self.pending.take().expect("checked above");
        let reordered = pending.batch.reordered > 0;
        self.commit_pending(pending).await.map_err(|e| retry_in_order(e, reordered))
    }

    /// When the received transactions should start their local commit:
    /// `None` while there are none, or a local commit is in flight (they
    /// follow it); otherwise at once, or, while the stream is busy (the
    /// first of them arrived within one commit delay of the end of the
    /// previous local commit), once it has waited the commit delay. So a
    /// transaction arriving alone is never held back.
    pub(crate) fn flush_due(&self) -> Option<std::time::Instant> {
        match &self.pending {
            Some(p) if !p.open && self.committing.is_none() => {
                Some(commit_at(p.started, self.last_commit_end, self.commit_delay))
            }
            _ => None,
        }
    }

    /// A local commit is in flight.
    pub(crate) fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Resolves when the local commit in flight has ended (at once if none
    /// is, or it already did). Cancel-safe: its outcome is kept for
    /// [`Self::settle_commit`].
    pub(crate) async fn commit_done(&mut self) {
        if let Some(c) = self.committing.as_mut()
            && c.outcome.is_none()
        {
            c.outcome = Some((&mut c.task).await);
        }
    }

    /// Before the applier is dropped after an error: waits for the commit
    /// in flight to end, whatever its outcome, so that the next session
    /// reads a stored position that no longer changes behind its back.
    pub(crate) async fn abandon(&mut self) {
        if let Some(c) = self.committing.take()
            && c.outcome.is_none()
        {
            let _ = c.task.await;
        }
    }

    /// Waits for the local commit in flight and does what follows it
    /// (stored position, status, subscribers, index changes). Its error is
    /// the session's: nothing after it was committed, and the stream is
    /// received again from the last committed position.
    pub(crate) async fn settle_commit(&mut self) -> Result<(), ReplicationError> {
        let Some(mut c) = self.committing.take() else {
            return Ok(());
        };
        let outcome = match c.outcome.take() {
            Some(outcome) => outcome,
            None => (&mut c.task).await,
        };
        let (prepared, result) =
            outcome.map_err(|e| ReplicationError::fatal(format!("apply commit task failed: {e}")))?;
        self.prepared = Some(prepared);
        let reordered = c.pending.batch.reordered > 0;
        result.map_err(|e| retry_in_order(e, reordered))?;
        c.pending.busy += c.started.elapsed();
        self.finish_commit(c.pending, c.end_lsn, c.commit_time).await
    }

    async fn commit_pending(&mut self, mut pending: Pending) -> Result<(), ReplicationError> {
        let Some((end_lsn, commit_time)) = pending.last_end else {
            return Ok(()); // only transactions applied before a restart
        };
        let mut steps = pending.batch.take_steps();
        let (lsn_sql, lsn_params) = store::applied_statement(end_lsn, Some(commit_time));
        let started = std::time::Instant::now();
        pending.settle().await?;
        let needs_lease = steps.iter().any(|s| matches!(s, Step::Copy { .. }));
        let local = match pending.local.take() {
            Some(tx) => Some(tx),
            None if needs_lease => {
                let tx = self.instance.begin().await?;
                tx.query(APPLY_SETTINGS, &[]).await?;
                Some(Arc::new(tx))
            }
            None => None,
        };
        match local {
            Some(tx) => {
                let tx =
                    Arc::into_inner(tx).ok_or_else(|| ReplicationError::fatal("local transaction still shared"))?;
                steps.push(Step::Sql(lsn_sql, lsn_params));
                run_steps(&tx, steps).await?;
                tx.commit().await?;
                pending.busy += started.elapsed();
                self.finish_commit(pending, end_lsn, commit_time).await
            }
            None => {
                // Small transactions: one round trip, prepared statements.
                // The stored LSN goes first (one transaction: the order
                // does not matter to readers) and carries the settings.
                let mut statements = vec![(format!("{lsn_sql} AND {PREPARED_SETTINGS}"), lsn_params)];
                statements.extend(steps.into_iter().filter_map(|s| match s {
                    Step::Sql(sql, params) => Some((sql, params)),
                    Step::Copy { .. } => None,
                }));
                let mut prepared = self.prepared.take().unwrap_or_else(|| Prepared::new(&self.instance));
                let instance = self.instance.clone();
                let task = tokio::spawn(async move {
                    let result = run_prepared(&mut prepared, &instance, &statements).await;
                    (prepared, result)
                });
                self.committing = Some(Committing { task, outcome: None, pending, end_lsn, commit_time, started });
                if !self.pipelined {
                    self.settle_commit().await?;
                }
                Ok(())
            }
        }
    }

    /// What follows a local commit.
    async fn finish_commit(&mut self, mut pending: Pending, end_lsn: Lsn, commit_time: i64) -> Result<(), ReplicationError> {
        self.last_commit_end = Some(std::time::Instant::now());
        tracing::debug!(
            lsn = %end_lsn,
            transactions = pending.done.len(),
            changes = pending.done.iter().map(|t| t.change_count).sum::<u64>(),
            elapsed = ?pending.started.elapsed(),
            local = ?pending.busy,
            "transaction applied"
        );
        self.committed = end_lsn;
        self.follow_indexes_now().await?;
        if end_lsn > self.server_wal_end {
            self.server_wal_end = end_lsn;
        }
        let applied_at = SystemTime::now();
        let commit_at = pg_time(commit_time);
        let delay = applied_at.duration_since(commit_at).unwrap_or(Duration::ZERO);
        let wal_end = self.server_wal_end;
        let tables = &self.tables;
        self.status.send_modify(|s| {
            s.applied_lsn = end_lsn;
            s.applied_commit_time = Some(commit_at);
            s.lag = delay;
            s.server_wal_end = wal_end;
            s.lag_bytes = end_lsn.distance_to(wal_end);
            s.unchanged_toast_values += pending.batch.unchanged_toast;
            s.applied_transactions += pending.done.len() as u64;
            s.local_commits += 1;
            s.applied_changes += pending.done.iter().map(|t| t.change_count).sum::<u64>();
            let now = crate::replication::lag::clock();
            for t in &pending.done {
                s.commit_lag.observe(applied_at.duration_since(t.commit_time).unwrap_or(Duration::ZERO), 1, now);
            }
            for (relation, [i, u, d]) in &pending.counts {
                let Some(KnownTable { schema, name, .. }) = tables.get(relation) else {
                    continue;
                };
                if let Some(t) = s.tables.iter_mut().find(|t| &t.schema == schema && &t.name == name) {
                    t.inserted += i;
                    t.updated += u;
                    t.deleted += d;
                }
            }
        });
        if self.changes.receiver_count() > 0 {
            for tx in std::mem::take(&mut pending.done) {
                let _ = self.changes.send(Arc::new(tx));
            }
        }
        Ok(())
    }
}

/// When received transactions, the first of which arrived at `first`,
/// start their local commit: at once, unless the stream is busy (`first`
/// came within one `delay` of the end of the previous local commit), then
/// `delay` after `first`.
pub(super) fn commit_at(
    first: std::time::Instant,
    last_commit_end: Option<std::time::Instant>,
    delay: Duration,
) -> std::time::Instant {
    let busy = last_commit_end.is_some_and(|end| first <= end + delay);
    if busy { first + delay } else { first }
}

/// Runs a small local transaction through prepared statements.
async fn run_prepared(
    prepared: &mut Prepared,
    instance: &Instance,
    statements: &[(String, Vec<crate::params::Param>)],
) -> Result<(), ReplicationError> {
    match prepared.transaction(statements).await {
        Err(e) if e.code() == Some(&crate::SqlState::READ_ONLY_SQL_TRANSACTION) => {
            // A read-only trigger function older than the
            // `pglite_cache.applying` setting (e.g. an instance restored
            // from an older cache's snapshot): bring the bookkeeping up to
            // date and try again; the failed round trip committed nothing.
            tracing::info!("updating pglite_cache.refuse_write() for the apply");
            store::init(instance).await?;
            Ok(prepared.transaction(statements).await?)
        }
        other => Ok(other?),
    }
}

/// A unique or exclusion violation from a batch whose inserts and updates
/// were grouped apart ([`batch`]) may be a transient duplicate of that
/// order (a unique index created locally since the table's Relation
/// message): reconnect, and the new session reads the table's indexes
/// again. Nothing of the failed batch was committed.
pub(super) fn retry_in_order(e: ReplicationError, reordered: bool) -> ReplicationError {
    let transient_duplicate = reordered
        && (e.code() == Some(&crate::SqlState::UNIQUE_VIOLATION)
            || e.code() == Some(&crate::SqlState::EXCLUSION_VIOLATION));
    if transient_duplicate {
        ReplicationError::transient(format!("{}; applying again with the changes in stream order", e.message()))
    } else {
        e
    }
}

#[cfg(test)]
mod commit_delay_tests {
    use std::time::{Duration, Instant};

    use super::commit_at;

    #[test]
    fn only_a_busy_stream_waits_the_commit_delay() {
        let delay = Duration::from_millis(1);
        let end = Instant::now();
        // The first local commit, and a transaction long after the last one: at once.
        assert_eq!(commit_at(end, None, delay), end);
        let late = end + Duration::from_millis(5);
        assert_eq!(commit_at(late, Some(end), delay), late);
        // Within one delay of the previous commit's end: it waits the delay.
        let soon = end + Duration::from_micros(300);
        assert_eq!(commit_at(soon, Some(end), delay), soon + delay);
        // No delay: never waits.
        assert_eq!(commit_at(soon, Some(end), Duration::ZERO), soon);
    }
}
