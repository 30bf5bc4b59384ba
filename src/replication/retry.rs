//! What every replication loop (slot, stream consumer, publisher) does after
//! a failed session: wait and reconnect, or halt.

use tokio::sync::watch;

use super::error::{ReplicationError, RetryPolicy};
use super::{Phase, Status};

/// The loop's next step after a failed session.
pub(crate) enum AfterFailure {
    /// The delay passed: connect again.
    Reconnect,
    /// Shutdown was asked for while waiting.
    Stop,
    /// Not retryable (or retries exhausted): the phase is `Halted`.
    Halt(ReplicationError),
}

/// Marks the phase `Reconnecting` and sleeps the error's delay (cut short
/// by shutdown), or marks it `Halted`. `what` names the loop in the logs;
/// `loud` logs a retry as an error (a condition an operator should see).
pub(crate) async fn after_failure(
    e: ReplicationError,
    attempt: &mut u32,
    status: &watch::Sender<Status>,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
    loud: bool,
) -> AfterFailure {
    match e.retry_policy(*attempt) {
        RetryPolicy::RetryAfter(delay) => {
            if loud {
                tracing::error!(error = %e, ?delay, attempt = *attempt, "{what}: still failing; retrying");
            } else {
                tracing::warn!(error = %e, ?delay, attempt = *attempt, "{what} interrupted; reconnecting");
            }
            *attempt += 1;
            let attempt = *attempt;
            status.send_modify(|s| s.phase = Phase::Reconnecting { error: e.to_string(), attempt });
            tokio::select! {
                biased;
                _ = shutdown.changed() => AfterFailure::Stop,
                _ = tokio::time::sleep(delay) => AfterFailure::Reconnect,
            }
        }
        RetryPolicy::ManualIntervention | RetryPolicy::NoRetry => {
            tracing::error!(error = %e, "{what} halted");
            status.send_modify(|s| s.phase = Phase::Halted { error: e.to_string() });
            AfterFailure::Halt(e)
        }
    }
}
