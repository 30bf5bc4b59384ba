//! The commit side of the apply: a big transaction's pieces sent while it
//! arrives, merged commits of small ones (group commit), and what follows a
//! local commit (status, lag, subscribers, index changes).

use super::*;

impl Applier {
    /// Sends the buffered statements into the open local transaction,
    /// opening it first if needed.
    pub(super) async fn send_buffered(&mut self) -> Result<(), ReplicationError> {
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
    /// right away, unless more of the stream is already waiting: then the
    /// next transactions join the same local transaction (group commit,
    /// each remote transaction still all-or-nothing for readers), up to
    /// [`MAX_MERGED`] transactions, [`MAX_MERGED_CHANGES`] row changes,
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
            || pending.batch.changes >= MAX_MERGED_CHANGES
            || pending.batch.buffered >= MAX_MERGED_BYTES
            || pending.started.elapsed() >= max_delay;
        if flush_now {
            self.flush_deferred().await?;
        }
        Ok(())
    }

    /// Remote transactions are received whole and wait for a merged commit.
    pub(crate) fn has_deferred(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.open)
    }

    /// When the received transactions should be committed: `None` while
    /// there are none; otherwise at once, or, while the stream is busy (the
    /// first of them arrived within one commit delay of the end of the
    /// previous local commit), once it has waited the commit delay. So a
    /// transaction arriving alone is never held back.
    pub(crate) fn flush_due(&self) -> Option<std::time::Instant> {
        match &self.pending {
            Some(p) if !p.open => Some(commit_at(p.started, self.last_commit_end, self.commit_delay)),
            _ => None,
        }
    }

    /// Not inside a remote transaction (merged commits may be waiting).
    pub(crate) fn between_transactions(&self) -> bool {
        self.pending.as_ref().is_none_or(|p| !p.open)
    }

    /// Commits the waiting remote transactions in one local transaction
    /// that also stores the last one's end LSN.
    pub(crate) async fn flush_deferred(&mut self) -> Result<(), ReplicationError> {
        if !self.has_deferred() {
            return Ok(());
        }
        let pending = self.pending.take().expect("checked above");
        let reordered = pending.batch.reordered > 0;
        self.commit_pending(pending).await.map_err(|e| retry_in_order(e, reordered))
    }

    async fn commit_pending(&mut self, mut pending: Pending) -> Result<(), ReplicationError> {
        let Some((end_lsn, commit_time)) = pending.last_end else {
            return Ok(()); // only transactions applied before a restart
        };
        let mut steps = pending.batch.take_steps();
        let (lsn_sql, lsn_params) = store::applied_statement(end_lsn, Some(commit_time));
        // Clients whose queries arrived while this batch was decoded go
        // first: `yield_now` lets the runtime poll their sockets before
        // the commit is queued, so they wait for no more than the engine's
        // current job (in a burst, the previous commit).
        tokio::task::yield_now().await;
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
                match self.prepared.transaction(&statements).await {
                    Err(e) if e.code() == Some(&crate::SqlState::READ_ONLY_SQL_TRANSACTION) => {
                        // A read-only trigger function older than the
                        // `pglite_cache.applying` setting (e.g. an instance
                        // restored from an older cache's snapshot): bring
                        // the bookkeeping up to date and try again; the
                        // failed round trip committed nothing.
                        tracing::info!("updating pglite_cache.refuse_write() for the apply");
                        store::init(&self.instance).await?;
                        self.prepared.transaction(&statements).await?;
                    }
                    other => other?,
                }
            }
        }
        pending.busy += started.elapsed();
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
/// are committed: at once, unless the stream is busy (`first` came within
/// one `delay` of the end of the previous local commit), then `delay`
/// after `first`.
pub(super) fn commit_at(
    first: std::time::Instant,
    last_commit_end: Option<std::time::Instant>,
    delay: Duration,
) -> std::time::Instant {
    let busy = last_commit_end.is_some_and(|end| first <= end + delay);
    if busy { first + delay } else { first }
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
