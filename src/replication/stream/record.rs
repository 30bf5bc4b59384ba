//! The records of a fan-out stream, and the two pure state machines around
//! them: the publisher's [`Chunker`] (pgoutput messages in, records out) and
//! the consumer's [`Sequencer`] (records in, what to do with each out).
//! No I/O.
//!
//! A record is one remote transaction, or one chunk of a big one, or an idle
//! progress mark. Its payload is the remote's own pgoutput messages, framed:
//!
//! ```text
//! "PGCF" | format u8 | kind u8 | last u8 | chunk u32 | commit_lsn u64 | end_lsn u64   (27 bytes, big endian)
//! then per message: length u32 | pgoutput bytes
//! ```
//!
//! Why raw pgoutput and not a format of our own: pgoutput is PostgreSQL's
//! documented, versioned format; the caches decode it with the same decoder
//! and apply it with the same apply as a cache fed by its own slot, so the
//! fan-out cannot drift from the direct path (types, TOAST, identities, schema
//! changes all behave alike). The frame adds only what the stream needs: the
//! commit LSN (order, dedup, exactly once), the chunk number and the end.
//!
//! Each transaction is self-contained: before the first change of a table in
//! a transaction the publisher inserts the table's latest Relation message
//! (the walsender sends one per session only). So a cache can start at any
//! transaction, and re-decoding the same WAL after a publisher restart gives
//! the same changes under the same record ids (what JetStream's
//! deduplication by `Nats-Msg-Id` relies on; the catalog facts below are read
//! again and may differ, as may the chunk boundaries they shift, which is
//! why a restarted publisher skips what the stream's last record shows as
//! stored rather than rely on the ids alone). Type, Origin and logical
//! Message messages are dropped: the apply ignores them.
//!
//! Format 2 adds the publisher's catalog facts (a frame tagged `F`, see
//! `replication::apply::facts`) right after each Relation message: what a
//! cache needs to follow a schema change without querying the remote. A
//! facts frame may also come alone before a change (newer enum labels for
//! the table's latest Relation message). Format 1 records (no facts) are
//! still read.
//!
//! Format 3 adds table copies (kind `C`, only these records carry format
//! 3, so an older cache refuses exactly them, with "upgrade"): a table
//! added to the publication (or to be copied again) travels as the rows of
//! a copy taken at a consistent point `X` (a temporary slot's), in chunks
//! like a big transaction. `commit_lsn` is `X` (`end_lsn` too, on the last
//! chunk); chunk 0 holds a header (tag `H`: the table, see
//! `super::table_copy`), the later chunks one `COPY` input each. The
//! publisher puts it after every transaction committed before `X` and
//! before every later one.

use std::collections::{HashMap, HashSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::replication::lsn::Lsn;
use crate::replication::pgoutput::{self, LogicalMessage};

const MAGIC: &[u8; 4] = b"PGCF";
const FORMAT: u8 = 2;
/// Table copies; the other records keep format 2, so that a cache that
/// reads format 2 refuses only these.
const FORMAT_COPY: u8 = 3;
/// Records without catalog facts, still read.
const FORMAT_WITHOUT_FACTS: u8 = 1;
const HEADER_LEN: usize = 27;

/// A malformed record (or a message the stream cannot carry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fan-out record: {0}")]
pub struct RecordError(pub String);

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A transaction, or a chunk of one.
    Transaction,
    /// The remote's WAL position while idle: nothing of the publication
    /// committed before it is missing from the stream.
    Progress,
    /// A table's copy at `commit_lsn`, or a chunk of one (format 3).
    Copy,
}

/// One stream record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Transaction or progress.
    pub kind: RecordKind,
    /// The transaction's commit LSN (Begin's `final_lsn`); for progress, the
    /// position.
    pub commit_lsn: Lsn,
    /// End of the commit record (last chunk only; else zero); for progress,
    /// the position.
    pub end_lsn: Lsn,
    /// Chunk number within the transaction, from 0.
    pub chunk: u32,
    /// The transaction's last chunk (always true for progress).
    pub last: bool,
    /// pgoutput messages.
    pub messages: Vec<Bytes>,
}

impl Record {
    /// A progress mark.
    pub fn progress(lsn: Lsn) -> Record {
        Record { kind: RecordKind::Progress, commit_lsn: lsn, end_lsn: lsn, chunk: 0, last: true, messages: vec![] }
    }

    /// The JetStream message id: a re-published record (after a publisher
    /// restart inside the duplicate window) is dropped by the server.
    /// `generation` is non-zero when the publisher re-sends a transaction
    /// whose first chunks are already in the stream (its chunking may
    /// differ, so the ids must too).
    pub fn msg_id(&self, generation: u64) -> String {
        let base = match self.kind {
            RecordKind::Transaction => format!("{:X}.{}", self.commit_lsn.0, self.chunk),
            RecordKind::Progress => format!("p{:X}", self.commit_lsn.0),
            RecordKind::Copy => format!("c{:X}.{}", self.commit_lsn.0, self.chunk),
        };
        if generation == 0 { base } else { format!("{base}.g{generation}") }
    }

    /// Bytes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.messages.iter().map(|m| 4 + m.len()).sum::<usize>()
    }

    /// Encodes the record.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        out.put_slice(MAGIC);
        out.put_u8(if self.kind == RecordKind::Copy { FORMAT_COPY } else { FORMAT });
        out.put_u8(match self.kind {
            RecordKind::Transaction => b'T',
            RecordKind::Progress => b'P',
            RecordKind::Copy => b'C',
        });
        out.put_u8(u8::from(self.last));
        out.put_u32(self.chunk);
        out.put_u64(self.commit_lsn.0);
        out.put_u64(self.end_lsn.0);
        for m in &self.messages {
            out.put_u32(m.len() as u32);
            out.put_slice(m);
        }
        out.freeze()
    }

    /// Decodes a record.
    pub fn decode(mut data: Bytes) -> Result<Record, RecordError> {
        if data.len() < HEADER_LEN || &data[..4] != MAGIC {
            return Err(RecordError("not a pglite-cache fan-out record".into()));
        }
        data.advance(4);
        let format = data.get_u8();
        if !(FORMAT_WITHOUT_FACTS..=FORMAT_COPY).contains(&format) {
            return Err(RecordError(format!(
                "record format {format}; this version reads formats up to {FORMAT_COPY}: upgrade"
            )));
        }
        let kind = match data.get_u8() {
            b'T' => RecordKind::Transaction,
            b'P' => RecordKind::Progress,
            b'C' if format == FORMAT_COPY => RecordKind::Copy,
            k => return Err(RecordError(format!("unknown record kind {k} in format {format}"))),
        };
        let last = data.get_u8() != 0;
        let chunk = data.get_u32();
        let commit_lsn = Lsn(data.get_u64());
        let end_lsn = Lsn(data.get_u64());
        let mut messages = Vec::new();
        while data.has_remaining() {
            if data.remaining() < 4 {
                return Err(RecordError("truncated message length".into()));
            }
            let len = data.get_u32() as usize;
            if data.remaining() < len {
                return Err(RecordError("truncated message".into()));
            }
            messages.push(data.split_to(len));
        }
        Ok(Record { kind, commit_lsn, end_lsn, chunk, last, messages })
    }
}

/// Catalog facts about a Relation message, as they travel with it.
struct Facts {
    /// All of them: with the message where it first appears.
    full: Bytes,
    /// With its later copies.
    lean: Bytes,
    /// The full ones are not in the stream yet.
    fresh: bool,
}

/// The open transaction of a [`Chunker`].
struct Open {
    commit_lsn: Lsn,
    chunk: u32,
    messages: Vec<Bytes>,
    size: usize,
    /// Relations whose description is already in this transaction.
    described: HashSet<u32>,
}

/// Turns the slot's pgoutput messages into records: one per transaction,
/// or chunks of at most about `max_bytes` (memory stays bounded whatever the
/// size of the transaction).
pub struct Chunker {
    max_bytes: usize,
    /// The latest Relation message of each table, and the catalog facts
    /// about it.
    relations: HashMap<u32, (Bytes, Option<Facts>)>,
    open: Option<Open>,
}

impl Chunker {
    /// A chunker making records of about `max_bytes` at most (a single
    /// message larger than that makes a larger record).
    pub fn new(max_bytes: usize) -> Chunker {
        Chunker { max_bytes, relations: HashMap::new(), open: None }
    }

    /// Inside a transaction.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Takes one pgoutput message; returns a record when one is complete.
    pub fn push(&mut self, data: Bytes) -> Result<Option<Record>, RecordError> {
        let tag = *data.first().ok_or_else(|| RecordError("empty pgoutput message".into()))?;
        match tag {
            b'B' => {
                let LogicalMessage::Begin { final_lsn, .. } = decode(&data)? else { unreachable!("tag B") };
                if self.open.is_some() {
                    return Err(RecordError("Begin inside a transaction".into()));
                }
                let size = data.len();
                self.open = Some(Open {
                    commit_lsn: final_lsn,
                    chunk: 0,
                    messages: vec![data],
                    size,
                    described: HashSet::new(),
                });
                Ok(None)
            }
            b'R' => {
                let id = relation_id(&data)?;
                self.relations.insert(id, (data, None));
                if let Some(open) = self.open.as_mut() {
                    // Described again before its next change.
                    open.described.remove(&id);
                }
                Ok(None)
            }
            b'Y' | b'O' | b'M' => Ok(None),
            b'I' | b'U' | b'D' => {
                let id = relation_id(&data)?;
                self.describe(id)?;
                self.append(data)
            }
            b'T' => {
                let LogicalMessage::Truncate { relations, .. } = decode(&data)? else { unreachable!("tag T") };
                for id in relations {
                    self.describe(id)?;
                }
                self.append(data)
            }
            b'C' => {
                let LogicalMessage::Commit { end_lsn, .. } = decode(&data)? else { unreachable!("tag C") };
                let mut open = self.open.take().ok_or_else(|| RecordError("Commit without Begin".into()))?;
                open.messages.push(data);
                Ok(Some(Record {
                    kind: RecordKind::Transaction,
                    commit_lsn: open.commit_lsn,
                    end_lsn,
                    chunk: open.chunk,
                    last: true,
                    messages: open.messages,
                }))
            }
            t => Err(RecordError(format!(
                "pgoutput message {:?} cannot travel in the stream (streamed transactions are not used)",
                t as char
            ))),
        }
    }

    /// Sets the catalog facts about table `id`'s latest Relation message
    /// (read by the publisher after [`Self::push`] took the message): `full`
    /// goes next to the message the next time it is put in, `lean` with
    /// its later copies. Facts that changed (newer enum labels) go into the
    /// open transaction now if it already described the table, before the
    /// change that needs them.
    pub fn set_facts(&mut self, id: u32, full: Bytes, lean: Bytes) -> Result<(), RecordError> {
        let entry = self
            .relations
            .get_mut(&id)
            .ok_or_else(|| RecordError(format!("catalog facts of unknown relation {id}")))?;
        let mut facts = Facts { full: full.clone(), lean, fresh: true };
        if let Some(open) = self.open.as_mut()
            && open.described.contains(&id)
        {
            open.size += full.len() + 4;
            open.messages.push(full);
            facts.fresh = false;
        }
        entry.1 = Some(facts);
        Ok(())
    }

    fn describe(&mut self, id: u32) -> Result<(), RecordError> {
        let open = self.open.as_mut().ok_or_else(|| RecordError("change outside a transaction".into()))?;
        if open.described.insert(id) {
            let (rel, facts) = self
                .relations
                .get_mut(&id)
                .ok_or_else(|| RecordError(format!("change of relation {id} before its Relation message")))?;
            open.size += rel.len() + 4;
            open.messages.push(rel.clone());
            if let Some(facts) = facts {
                let frame = if facts.fresh { &facts.full } else { &facts.lean };
                facts.fresh = false;
                open.size += frame.len() + 4;
                open.messages.push(frame.clone());
            }
        }
        Ok(())
    }

    fn append(&mut self, data: Bytes) -> Result<Option<Record>, RecordError> {
        let open = self.open.as_mut().ok_or_else(|| RecordError("change outside a transaction".into()))?;
        open.size += data.len() + 4;
        open.messages.push(data);
        if open.size < self.max_bytes {
            return Ok(None);
        }
        let record = Record {
            kind: RecordKind::Transaction,
            commit_lsn: open.commit_lsn,
            end_lsn: Lsn::ZERO,
            chunk: open.chunk,
            last: false,
            messages: std::mem::take(&mut open.messages),
        };
        open.chunk += 1;
        open.size = 0;
        Ok(Some(record))
    }
}

fn decode(data: &Bytes) -> Result<LogicalMessage, RecordError> {
    pgoutput::decode(data, false).map_err(|e| RecordError(e.to_string()))
}

fn relation_id(data: &[u8]) -> Result<u32, RecordError> {
    let bytes: [u8; 4] =
        data.get(1..5).and_then(|b| b.try_into().ok()).ok_or_else(|| RecordError("short message".into()))?;
    Ok(u32::from_be_bytes(bytes))
}

/// What a consumer does with the next record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Apply its messages.
    Feed,
    /// Already applied, a duplicate, or a chunk of a transaction skipped.
    Skip,
    /// The transaction being applied was cut off (the publisher stopped
    /// mid-transaction and sent it again from its start): roll back what was
    /// applied of it, then apply this record.
    Restart,
    /// Idle progress: everything before this position is applied.
    Progress(Lsn),
}

/// The consumer's view of the stream: which transaction is open, which
/// chunk comes next, what is already applied. Exactly once rests on LSNs,
/// not on the broker: a record whose commit is below what was applied is
/// skipped, whatever the stream holds.
#[derive(Debug, Clone)]
pub struct Sequencer {
    /// The open transaction and its next chunk.
    open: Option<(Lsn, u32)>,
    /// End of the last transaction applied (or fed), or the last progress.
    applied: Lsn,
}

impl Sequencer {
    /// Starts after `applied` (the stored position).
    pub fn new(applied: Lsn) -> Sequencer {
        Sequencer { open: None, applied }
    }

    /// Inside a transaction.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Decides about `record` and moves on.
    pub fn next(&mut self, record: &Record) -> Result<Action, RecordError> {
        match record.kind {
            RecordKind::Progress => {
                if self.open.is_some() || record.end_lsn <= self.applied {
                    return Ok(Action::Skip);
                }
                self.applied = record.end_lsn;
                Ok(Action::Progress(record.end_lsn))
            }
            // A table copy is sequenced like a transaction at its point.
            RecordKind::Transaction | RecordKind::Copy if record.chunk == 0 => {
                if record.commit_lsn < self.applied {
                    return Ok(Action::Skip);
                }
                let action = if self.open.is_some() { Action::Restart } else { Action::Feed };
                self.open = Some((record.commit_lsn, 1));
                self.close_if_last(record);
                Ok(action)
            }
            RecordKind::Transaction | RecordKind::Copy => match self.open {
                Some((lsn, next)) if lsn == record.commit_lsn && next == record.chunk => {
                    self.open = Some((lsn, next + 1));
                    self.close_if_last(record);
                    Ok(Action::Feed)
                }
                Some((lsn, next)) if lsn == record.commit_lsn && record.chunk > next => Err(RecordError(format!(
                    "chunk {} of transaction {lsn} follows chunk {}: the stream lost a record",
                    record.chunk,
                    next - 1
                ))),
                _ => Ok(Action::Skip),
            },
        }
    }

    fn close_if_last(&mut self, record: &Record) {
        if record.last {
            self.open = None;
            self.applied = record.end_lsn;
        }
    }
}

#[cfg(test)]
mod tests;
