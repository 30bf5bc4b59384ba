//! Classified replication errors.
//!
//! Every error says what kind of failure it is, which decides what the
//! supervisor does with it (the supabase/etl model):
//! - [`ErrorKind::Transient`]: the network dropped, the walsender was
//!   terminated, the remote restarted or is not reachable yet. Reconnect with
//!   exponential backoff and jitter, resume from the last committed LSN.
//! - [`ErrorKind::NeedsOperator`]: something only a person can fix (the slot
//!   was dropped or invalidated, a table changed incompatibly upstream,
//!   permissions). Replication halts; the hint says what to do.
//! - [`ErrorKind::Fatal`]: a bug or an impossible state (undecodable
//!   message, local instance crashed). Replication halts.

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;

/// What kind of failure an error is, and so what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retry after a delay: reconnect and resume.
    Transient,
    /// Halt until an operator acts (see the hint).
    NeedsOperator,
    /// Halt: the failure cannot be retried.
    Fatal,
}

/// What the supervisor does after an error of a given kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Retry after (at least) this delay.
    RetryAfter(Duration),
    /// Halt until an operator acts.
    ManualIntervention,
    /// Never retry.
    NoRetry,
}

/// A replication failure with its kind and a hint for the operator.
#[derive(Debug, Clone)]
pub struct ReplicationError {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    /// SQLSTATE when the remote or the local instance reported the error.
    code: Option<SqlState>,
    /// The slot is gone: set where the error arose (`START_REPLICATION`),
    /// from its SQLSTATE, never from message text (which is localized).
    slot_lost: bool,
}

impl ReplicationError {
    /// A transient error (reconnect and resume).
    pub fn transient(message: impl Into<String>) -> Self {
        ReplicationError {
            kind: ErrorKind::Transient,
            message: message.into(),
            hint: None,
            code: None,
            slot_lost: false,
        }
    }

    /// An error that needs an operator.
    pub fn needs_operator(message: impl Into<String>, hint: impl Into<String>) -> Self {
        ReplicationError {
            kind: ErrorKind::NeedsOperator,
            message: message.into(),
            hint: Some(hint.into()),
            code: None,
            slot_lost: false,
        }
    }

    /// A fatal error.
    pub fn fatal(message: impl Into<String>) -> Self {
        ReplicationError { kind: ErrorKind::Fatal, message: message.into(), hint: None, code: None, slot_lost: false }
    }

    /// Adds (or replaces) the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// The SQLSTATE, if a database reported the error.
    pub fn code(&self) -> Option<&SqlState> {
        self.code.as_ref()
    }

    /// What to do next; `attempt` counts consecutive failures (from 0).
    pub fn retry_policy(&self, attempt: u32) -> RetryPolicy {
        match self.kind {
            ErrorKind::Transient => RetryPolicy::RetryAfter(backoff(attempt)),
            ErrorKind::NeedsOperator => RetryPolicy::ManualIntervention,
            ErrorKind::Fatal => RetryPolicy::NoRetry,
        }
    }

    /// Classifies an error reported by the remote by its SQLSTATE.
    pub(crate) fn from_remote(code: SqlState, message: String, hint: Option<String>) -> Self {
        let kind = classify_remote(&code);
        let hint = hint.or_else(|| default_hint(&code));
        ReplicationError { kind, message, hint, code: Some(code), slot_lost: false }
    }

    /// Marks the error as "the slot is gone" (dropped, or invalidated by WAL
    /// retention limits): needs an operator, or a resync by policy.
    pub(crate) fn into_slot_lost(mut self, hint: impl Into<String>) -> Self {
        self.slot_lost = true;
        self.kind = ErrorKind::NeedsOperator;
        self.hint = Some(hint.into());
        self
    }

    /// The slot was dropped or invalidated on the remote.
    pub fn is_slot_lost(&self) -> bool {
        self.slot_lost
    }

    /// Another walsender still holds the slot (55006), e.g. the previous
    /// connection's, lingering after a network drop until the remote notices.
    pub fn is_slot_in_use(&self) -> bool {
        self.code.as_ref() == Some(&SqlState::OBJECT_IN_USE)
    }
}

/// Classifies an error that `START_REPLICATION` returned: by SQLSTATE in
/// this context, a missing slot (42704) or one that can no longer be read
/// (55000, invalidated) is lost; 55006 (held by another walsender) is
/// transient.
pub(crate) fn classify_start_replication(e: ReplicationError, hint: impl FnOnce() -> String) -> ReplicationError {
    match e.code() {
        Some(c) if *c == SqlState::UNDEFINED_OBJECT || *c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE => {
            e.into_slot_lost(hint())
        }
        _ => e,
    }
}

/// Exponential backoff from 500 ms doubling to 30 s, with ±25% jitter so that
/// many instances don't reconnect in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let base_ms = 500u64.saturating_mul(1u64 << attempt.min(6)).min(30_000);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = (u64::from(nanos) % (base_ms / 2 + 1)) as i64 - (base_ms / 4) as i64;
    Duration::from_millis((base_ms as i64 + jitter).max(50) as u64)
}

fn classify_remote(code: &SqlState) -> ErrorKind {
    let class = &code.code()[..2];
    match class {
        // connection exceptions, operator intervention (admin shutdown,
        // terminate_backend, crash shutdown, cannot connect now),
        // insufficient resources, system errors
        "08" | "57" | "53" | "58" => ErrorKind::Transient,
        // serialization failures and deadlocks
        "40" => ErrorKind::Transient,
        // object in use (the slot is still held by the previous walsender),
        // lock not available
        _ if *code == SqlState::OBJECT_IN_USE || *code == SqlState::LOCK_NOT_AVAILABLE => ErrorKind::Transient,
        // privileges, undefined objects (slot or publication missing),
        // prerequisite state (slot invalidated, wal_level), config
        "28" | "42" | "55" | "F0" => ErrorKind::NeedsOperator,
        _ if *code == SqlState::INVALID_PARAMETER_VALUE => ErrorKind::NeedsOperator,
        _ => ErrorKind::Fatal,
    }
}

/// A hint by SQLSTATE alone (message text is localized on the remote);
/// errors whose meaning depends on where they arose get theirs there.
fn default_hint(code: &SqlState) -> Option<String> {
    match code.code() {
        c if c.starts_with("28") => Some("check the user and password in the source URL and pg_hba.conf".into()),
        "42501" => {
            Some("the user needs the REPLICATION attribute (or superuser) and SELECT on the published tables".into())
        }
        "53400" => Some("raise max_replication_slots / max_wal_senders on the remote".into()),
        "55006" => Some(
            "another connection still holds the replication slot (usually the previous walsender, until the \
             remote's wal_sender_timeout notices it is gone); retrying. If it persists, find it with \
             SELECT active_pid FROM pg_replication_slots and end it with pg_terminate_backend(pid) on the remote"
                .into(),
        ),
        _ => None,
    }
}

impl fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Transient => "transient",
            ErrorKind::NeedsOperator => "needs operator",
            ErrorKind::Fatal => "fatal",
        };
        write!(f, "{} ({kind})", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\nHINT: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ReplicationError {}

impl From<tokio_postgres::Error> for ReplicationError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => ReplicationError::from_remote(
                db.code().clone(),
                format!("remote: {}", db.message()),
                db.hint().map(str::to_owned),
            ),
            // I/O, closed connection, timeouts: the network.
            None => ReplicationError::transient(format!("remote connection: {e}")),
        }
    }
}

impl ReplicationError {
    /// Fatal if the local instance is closed for good (crashed beyond its
    /// restart policy, or stopped): retrying could not help.
    pub(crate) fn halt_if_closed(self, instance: &crate::Instance) -> ReplicationError {
        if !instance.is_closed() {
            return self;
        }
        ReplicationError { kind: ErrorKind::Fatal, ..self }
            .with_hint("the local instance is gone; start it again and restart replication (it resumes)")
    }
}

impl From<crate::Error> for ReplicationError {
    fn from(e: crate::Error) -> Self {
        match &e {
            crate::Error::Db(db) => ReplicationError {
                kind: ErrorKind::Fatal,
                message: format!("local instance: {db}"),
                hint: db.hint.clone(),
                code: Some(db.code.clone()),
                slot_lost: false,
            },
            // A crashed instance with a restart policy is open again by the
            // next attempt; one that is gone halts it (`halt_if_closed`).
            crate::Error::Crashed { .. } => ReplicationError::transient(format!("local instance: {e}")),
            crate::Error::Stopped(_) => ReplicationError::fatal(format!("local instance: {e}"))
                .with_hint("the local instance is gone; start it again and restart replication (it resumes)"),
            _ => ReplicationError::fatal(format!("local instance: {e}")),
        }
    }
}

impl From<std::io::Error> for ReplicationError {
    fn from(e: std::io::Error) -> Self {
        ReplicationError::transient(format!("remote connection: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_remote_errors() {
        let e = ReplicationError::from_remote(SqlState::ADMIN_SHUTDOWN, "terminating connection".into(), None);
        assert_eq!(e.kind(), ErrorKind::Transient);
        // Classified by SQLSTATE and context, whatever the (localized) text.
        let e = ReplicationError::from_remote(SqlState::UNDEFINED_OBJECT, "le slot n'existe pas".into(), None);
        assert_eq!(e.kind(), ErrorKind::NeedsOperator);
        assert!(!e.is_slot_lost());
        let e = classify_start_replication(e, || "resync".into());
        assert!(e.is_slot_lost());
        assert_eq!(e.hint(), Some("resync"));
        assert_eq!(e.retry_policy(0), RetryPolicy::ManualIntervention);
        let e = ReplicationError::from_remote(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "invalidé".into(), None);
        assert!(classify_start_replication(e, String::new).is_slot_lost());
        // The slot still held by the previous walsender: retried.
        let e = ReplicationError::from_remote(SqlState::OBJECT_IN_USE, "actif pour le PID 42".into(), None);
        assert!(e.is_slot_in_use());
        let e = classify_start_replication(e, String::new);
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(!e.is_slot_lost());
        assert!(matches!(e.retry_policy(2), RetryPolicy::RetryAfter(_)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) <= Duration::from_millis(700));
        assert!(backoff(3) >= Duration::from_millis(3_000));
        assert!(backoff(30) <= Duration::from_millis(37_500));
    }
}
