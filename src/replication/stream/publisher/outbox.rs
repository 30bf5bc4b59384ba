//! The publisher's side of JetStream: where a session resumes (from the
//! stream's last record), and records published pipelined, their acks
//! awaited in order.

use std::future::Future;
use std::pin::Pin;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures_util::stream::FuturesOrdered;

use crate::replication::error::ReplicationError;
use crate::replication::lsn::Lsn;

use super::super::nats::transient;
use super::super::record::{Record, RecordKind};

/// What an acknowledged record confirms: an LSN, and a table copy complete.
pub(super) type Acked = (Result<(), ReplicationError>, Option<Lsn>, Option<u32>);
pub(super) type AckFuture = Pin<Box<dyn Future<Output = Acked> + Send>>;

/// Where a session starts, from the stream's last record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Resume {
    /// The stream's last sequence number.
    pub(super) last_seq: u64,
    /// Transactions committed before this are in the stream already.
    pub(super) skip_below: Lsn,
    /// A transaction whose first chunks are in the stream, cut off.
    pub(super) cut_off: Lsn,
    /// Its records get other ids this time.
    pub(super) generation: u64,
}

impl Resume {
    pub(super) fn from_tail(tail: Option<&Record>, last_seq: u64) -> Resume {
        match tail {
            None => Resume { last_seq, skip_below: Lsn::ZERO, cut_off: Lsn(u64::MAX), generation: 0 },
            Some(r) if r.last || r.kind == RecordKind::Progress => {
                Resume { last_seq, skip_below: r.end_lsn, cut_off: Lsn(u64::MAX), generation: 0 }
            }
            Some(r) => Resume { last_seq, skip_below: r.commit_lsn, cut_off: r.commit_lsn, generation: last_seq },
        }
    }
}

/// Publishes one record, pipelined: the ack is awaited later, in order.
#[allow(clippy::too_many_arguments)]
pub(super) async fn publish(
    js: &jetstream::Context,
    subject: &str,
    record: &Record,
    generation: u64,
    last_seq: u64,
    confirms: Option<Lsn>,
    copied: Option<u32>,
    recopy: Option<String>,
    in_flight: &mut FuturesOrdered<AckFuture>,
) -> Result<u64, ReplicationError> {
    let mut message = PublishMessage::build().payload(record.encode()).message_id(record.msg_id(generation));
    if let Some(oids) = recopy {
        message = message.header(super::RECOPY_HEADER, oids.as_str());
    }
    if last_seq > 0 {
        message = message.expected_last_sequence(last_seq);
    }
    let ack: PublishAckFuture =
        js.send_publish(subject.to_owned(), message).await.map_err(|e| transient("publishing to the stream", e))?;
    in_flight.push_back(Box::pin(async move {
        let result = match ack.await {
            Ok(ack) if ack.duplicate => {
                tracing::debug!(seq = ack.sequence, "duplicate record dropped by JetStream");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(transient("JetStream did not store a record", e)),
        };
        (result, confirms, copied)
    }));
    Ok(last_seq + 1)
}

pub(super) fn commit_end(data: &Bytes) -> Result<Lsn, ReplicationError> {
    let bytes: [u8; 8] =
        data.get(10..18).and_then(|b| b.try_into().ok()).ok_or_else(|| ReplicationError::fatal("short Commit"))?;
    Ok(Lsn(u64::from_be_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_follows_the_stream_tail() {
        assert_eq!(Resume::from_tail(None, 0).skip_below, Lsn::ZERO);
        let done = Record {
            kind: RecordKind::Transaction,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            chunk: 2,
            last: true,
            messages: vec![],
        };
        let r = Resume::from_tail(Some(&done), 7);
        assert_eq!((r.skip_below, r.generation, r.last_seq), (Lsn(20), 0, 7));
        let cut = Record { last: false, end_lsn: Lsn::ZERO, ..done.clone() };
        let r = Resume::from_tail(Some(&cut), 9);
        assert_eq!((r.skip_below, r.cut_off, r.generation), (Lsn(10), Lsn(10), 9));
        let r = Resume::from_tail(Some(&Record::progress(Lsn(30))), 11);
        assert_eq!(r.skip_below, Lsn(30));
        // A table copy at 40 follows every transaction committed before 40.
        let copied = Record { kind: RecordKind::Copy, commit_lsn: Lsn(40), end_lsn: Lsn(40), ..done.clone() };
        assert_eq!(Resume::from_tail(Some(&copied), 12).skip_below, Lsn(40));
        let cut = Record { last: false, end_lsn: Lsn::ZERO, ..copied };
        assert_eq!(Resume::from_tail(Some(&cut), 13).skip_below, Lsn(40));
    }

    #[test]
    fn commit_end_reads_the_end_lsn() {
        let mut b = vec![b'C', 0];
        b.extend(5u64.to_be_bytes());
        b.extend(9u64.to_be_bytes());
        b.extend(0i64.to_be_bytes());
        assert_eq!(commit_end(&Bytes::from(b)).unwrap(), Lsn(9));
    }
}
