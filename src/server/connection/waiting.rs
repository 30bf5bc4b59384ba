//! Waiting for the engine: which batches can be withdrawn while they wait
//! (cancel, queue wait limit) and what the client gets instead, and which
//! may run beside another client's transaction.

use bytes::BytesMut;

use crate::server::backend;

/// How many statement groups (ended by `Sync` or `Query`) a batch has, if it
/// can be answered without running when it is withdrawn before it runs: it
/// must end with a `Sync` or `Query`, so that an `ErrorResponse` and
/// `ReadyForQuery` per group is exactly what the client expects from groups
/// whose first statement failed. 0 if it cannot.
pub(super) fn withdrawable_groups(batch: &[u8]) -> usize {
    let mut groups = 0;
    let mut last = 0;
    for (tag, _) in backend::messages(batch) {
        if matches!(tag, b'S' | b'Q') {
            groups += 1;
        }
        last = tag;
    }
    if matches!(last, b'S' | b'Q') { groups } else { 0 }
}

/// Whether a batch is only `Parse`, `Describe` of a statement and `Close`,
/// ending in its one `Sync`: work that can run beside another client's
/// transaction.
pub(super) fn is_side_work(batch: &[u8]) -> bool {
    let mut last = 0;
    for (tag, message) in backend::messages(batch) {
        let ok = match tag {
            b'P' | b'C' => true,
            b'D' => message.get(5) == Some(&b'S'),
            b'S' => last != b'S',
            _ => false,
        };
        if !ok || last == b'S' {
            return false;
        }
        last = tag;
    }
    last == b'S'
}

/// Why a batch was withdrawn before it ran.
#[derive(Debug, Clone, Copy)]
pub(super) enum Withdrawn {
    Cancelled,
    QueueTimeout(std::time::Duration),
}

impl Withdrawn {
    /// SQLSTATE and message of the error the client gets.
    pub(super) fn error(self) -> (&'static str, String) {
        match self {
            Withdrawn::Cancelled => ("57014", "canceling statement due to user request".into()),
            Withdrawn::QueueTimeout(limit) => (
                "57014",
                format!(
                    "canceling statement due to queue wait timeout: waited {limit:?} for the engine \
                     behind other clients' transactions (queue_wait_timeout)"
                ),
            ),
        }
    }
}

/// The answer to a withdrawn batch: an error and `ReadyForQuery` per group.
/// Outside a transaction (the connection does not hold the engine) it
/// stays idle; inside one (begun lazily, see `lazy_begin.rs`) the first
/// error fails the transaction and the later groups are refused as
/// PostgreSQL refuses statements in a failed transaction.
pub(super) fn withdrawn_answer(groups: usize, why: Withdrawn, in_transaction: bool) -> Vec<u8> {
    let mut reply = BytesMut::new();
    let (code, text) = why.error();
    for group in 0..groups {
        if in_transaction && group > 0 {
            backend::error_response(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
                &mut reply,
            );
        } else {
            backend::error_response("ERROR", code, &text, &mut reply);
        }
        backend::ready_for_query(if in_transaction { b'E' } else { b'I' }, &mut reply);
    }
    reply.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(tags: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        for &tag in tags {
            match tag {
                b'D' => out.extend_from_slice(b"D\0\0\0\x08Ss0\0"),
                b'd' => out.extend_from_slice(b"D\0\0\0\x08Pp0\0"),
                other => out.extend_from_slice(&[other, 0, 0, 0, 4]),
            }
        }
        out
    }

    #[test]
    fn counts_withdrawable_groups() {
        assert_eq!(withdrawable_groups(&batch(b"PBES")), 1);
        assert_eq!(withdrawable_groups(&batch(b"PBESPBES")), 2);
        assert_eq!(withdrawable_groups(&batch(b"PBESQ")), 2);
        assert_eq!(withdrawable_groups(&batch(b"PBESPBH")), 0);
        let answer = withdrawn_answer(2, Withdrawn::QueueTimeout(std::time::Duration::from_secs(1)), false);
        let tags: Vec<u8> = backend::messages(&answer).map(|(t, _)| t).collect();
        assert_eq!(tags, b"EZEZ");
        assert_eq!(backend::last_ready_status(&answer), Some(b'I'));
        let answer = withdrawn_answer(2, Withdrawn::Cancelled, true);
        assert_eq!(backend::last_ready_status(&answer), Some(b'E'));
        assert!(answer.windows(5).any(|w| w == b"25P02"));
    }

    #[test]
    fn side_work_is_parse_describe_statement_close_and_one_sync() {
        assert!(is_side_work(&batch(b"PS")));
        assert!(is_side_work(&batch(b"PDS")));
        assert!(is_side_work(&batch(b"CPDS")));
        assert!(!is_side_work(&batch(b"PdS")), "Describe of a portal");
        assert!(!is_side_work(&batch(b"PBES")));
        assert!(!is_side_work(&batch(b"PSPS")));
        assert!(!is_side_work(&batch(b"PH")));
    }
}
