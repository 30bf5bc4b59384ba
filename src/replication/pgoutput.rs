//! Decoder of the pgoutput logical replication messages (protocol versions
//! 1 and 2, see "Logical Replication Message Formats" in the PostgreSQL
//! docs). Plain functions over bytes, no I/O. Values stay in the text format
//! the remote sent them in: they are fed back to PostgreSQL's input functions
//! locally, which keeps every type (enums, arrays, ranges...) exact.

use bytes::{Buf, Bytes};

use super::lsn::Lsn;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

type Result<T> = std::result::Result<T, DecodeError>;

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key sent with UPDATE and DELETE).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID on the remote.
    pub type_oid: u32,
    /// Type modifier (e.g. varchar length), -1 if none.
    pub type_modifier: i32,
}

/// A table's description; sent before its first change in a session and
/// again after it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The remote table's OID (how later changes name it).
    pub id: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Published columns, in order.
    pub columns: Vec<RelationColumn>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value: the remote did not send it; keep ours.
    Unchanged,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in binary format (only with the `binary` option).
    Binary(Bytes),
}

impl Value {
    /// The text, if this is a text value.
    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A row's values, one per column of the relation.
pub type Tuple = Vec<Value>;

/// The old row sent with UPDATE and DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns (others are NULL).
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The values.
    pub fn values(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// A transaction starts.
    Begin {
        /// LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time (PostgreSQL microseconds since 2000-01-01).
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// The transaction committed.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: where the next transaction can start.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: i64,
    },
    /// Where the transaction came from (replication origins).
    Origin {
        /// Commit LSN on the origin.
        lsn: Lsn,
        /// Origin name.
        name: String,
    },
    /// A table's description.
    Relation(Relation),
    /// A user type's name.
    Type {
        /// Type OID.
        id: u32,
        /// Schema.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Table OID.
        relation: u32,
        /// The row.
        new: Tuple,
    },
    /// A changed row.
    Update {
        /// Table OID.
        relation: u32,
        /// The old key (if the key changed) or the old row (FULL identity).
        old: Option<OldTuple>,
        /// The new row (unchanged TOAST values are [`Value::Unchanged`]).
        new: Tuple,
    },
    /// A deleted row.
    Delete {
        /// Table OID.
        relation: u32,
        /// Its key, or the whole row with FULL identity.
        old: OldTuple,
    },
    /// One TRUNCATE of one or more tables.
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        /// Table OIDs.
        relations: Vec<u32>,
    },
    /// A `pg_logical_emit_message` message.
    Message {
        /// Part of the transaction (else sent right away).
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Its prefix.
        prefix: String,
        /// Its content.
        content: Bytes,
    },
    /// A chunk of a streamed (in-progress) transaction starts (v2).
    StreamStart {
        /// Transaction id.
        xid: u32,
        /// The first chunk of this transaction.
        first: bool,
    },
    /// The current chunk ends (v2).
    StreamStop,
    /// A streamed transaction committed (v2).
    StreamCommit {
        /// Transaction id.
        xid: u32,
        /// Commit LSN.
        commit_lsn: Lsn,
        /// End of the commit record.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: i64,
    },
    /// A streamed (sub)transaction aborted (v2).
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// The aborted subtransaction (equal to `xid` for the whole one).
        subxid: u32,
    },
}

/// Truncate option bits.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bits.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Decodes one message. `in_stream` tells whether it sits between a
/// StreamStart and a StreamStop, where data messages carry a transaction id.
pub fn decode(data: &Bytes, in_stream: bool) -> Result<LogicalMessage> {
    let mut r = Reader(data.clone());
    let tag = r.u8()?;
    let msg = match tag {
        b'B' => LogicalMessage::Begin { final_lsn: r.lsn()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => LogicalMessage::Commit { flags: r.u8()?, commit_lsn: r.lsn()?, end_lsn: r.lsn()?, commit_time: r.i64()? },
        b'O' => LogicalMessage::Origin { lsn: r.lsn()?, name: r.cstr()? },
        b'R' => {
            if in_stream {
                r.u32()?;
            }
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                columns.push(RelationColumn {
                    is_key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            LogicalMessage::Relation(Relation { id, namespace, name, replica_identity, columns })
        }
        b'Y' => {
            if in_stream {
                r.u32()?;
            }
            LogicalMessage::Type { id: r.u32()?, namespace: r.cstr()?, name: r.cstr()? }
        }
        b'I' => {
            if in_stream {
                r.u32()?;
            }
            let relation = r.u32()?;
            expect(r.u8()?, b'N', "Insert")?;
            LogicalMessage::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            if in_stream {
                r.u32()?;
            }
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                let tuple = r.tuple()?;
                old = Some(if kind == b'K' { OldTuple::Key(tuple) } else { OldTuple::Full(tuple) });
                kind = r.u8()?;
            }
            expect(kind, b'N', "Update")?;
            LogicalMessage::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            if in_stream {
                r.u32()?;
            }
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(DecodeError(format!("Delete: unexpected tuple kind {:?}", other as char))),
            };
            LogicalMessage::Delete { relation, old }
        }
        b'T' => {
            if in_stream {
                r.u32()?;
            }
            let n = r.u32()?;
            let options = r.u8()?;
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_>>()?;
            LogicalMessage::Truncate { options, relations }
        }
        b'M' => {
            if in_stream {
                r.u32()?;
            }
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            LogicalMessage::Message { transactional, lsn, prefix, content: r.bytes(len)? }
        }
        b'S' => LogicalMessage::StreamStart { xid: r.u32()?, first: r.u8()? == 1 },
        b'E' => LogicalMessage::StreamStop,
        b'c' => {
            let xid = r.u32()?;
            r.u8()?; // flags
            LogicalMessage::StreamCommit { xid, commit_lsn: r.lsn()?, end_lsn: r.lsn()?, commit_time: r.i64()? }
        }
        b'A' => LogicalMessage::StreamAbort { xid: r.u32()?, subxid: r.u32()? },
        other => return Err(DecodeError(format!("unknown message type {:?}", other as char))),
    };
    Ok(msg)
}

fn expect(got: u8, want: u8, what: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeError(format!("{what}: expected {:?}, got {:?}", want as char, got as char)))
    }
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<()> {
        if self.0.remaining() < n {
            Err(DecodeError(format!("truncated: needed {n} more bytes, {} left", self.0.remaining())))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn i16(&mut self) -> Result<i16> {
        self.need(2)?;
        Ok(self.0.get_i16())
    }
    fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn i32(&mut self) -> Result<i32> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }
    fn i64(&mut self) -> Result<i64> {
        self.need(8)?;
        Ok(self.0.get_i64())
    }
    fn lsn(&mut self) -> Result<Lsn> {
        self.need(8)?;
        Ok(Lsn(self.0.get_u64()))
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn cstr(&mut self) -> Result<String> {
        let end = self.0.iter().position(|&b| b == 0).ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = self.0.split_to(end);
        self.0.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError("string is not UTF-8".into()))
    }
    fn tuple(&mut self) -> Result<Tuple> {
        let n = self.i16()?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    Value::Binary(self.bytes(len)?)
                }
                other => return Err(DecodeError(format!("unknown tuple value kind {:?}", other as char))),
            });
        }
        Ok(values)
    }
}
