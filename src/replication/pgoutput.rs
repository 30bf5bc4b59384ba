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

/// Truncate option bit: `RESTART IDENTITY`. (`CASCADE`, bit 1, needs nothing
/// here: pgoutput lists every table the cascade reached.)
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Decodes one message. `in_stream` tells whether it sits between a
/// StreamStart and a StreamStop, where data messages carry a transaction id.
pub fn decode(data: &Bytes, in_stream: bool) -> Result<LogicalMessage> {
    let mut r = Reader(data.clone());
    let tag = r.u8()?;
    let msg = match tag {
        b'B' => LogicalMessage::Begin { final_lsn: r.lsn()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => {
            LogicalMessage::Commit { flags: r.u8()?, commit_lsn: r.lsn()?, end_lsn: r.lsn()?, commit_time: r.i64()? }
        }
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
                other => {
                    return Err(DecodeError(format!("Delete: unexpected tuple kind {:?}", other as char)));
                }
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
    if r.0.has_remaining() {
        return Err(DecodeError(format!("{} trailing bytes after message {:?}", r.0.remaining(), tag as char)));
    }
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

/// Every message type, decoded from bytes captured from PostgreSQL 15 with
/// `pg_logical_slot_peek_binary_changes` (protocol 1, and 2 with streaming).
#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Bytes {
        Bytes::from((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>())
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn one(s: &str, in_stream: bool) -> LogicalMessage {
        decode(&hex(s), in_stream).unwrap()
    }

    #[test]
    fn begin_and_commit() {
        assert_eq!(
            one("420000000001532df0000304322d630fcd000002d5", false),
            LogicalMessage::Begin { final_lsn: "0/1532DF0".parse().unwrap(), commit_time: 0x304322d630fcd, xid: 725 }
        );
        assert_eq!(
            one("43000000000001532df00000000001533030000304322d630fcd", false),
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: "0/1532DF0".parse().unwrap(),
                end_lsn: "0/1533030".parse().unwrap(),
                commit_time: 0x304322d630fcd,
            }
        );
    }

    #[test]
    fn relation() {
        let LogicalMessage::Relation(rel) = one(
            "52000040007075626c69630074006400030169640000000017ffffffff00760000000019ffffffff006e0000000017ffffffff",
            false,
        ) else {
            panic!("not a Relation")
        };
        assert_eq!(
            (rel.id, rel.namespace.as_str(), rel.name.as_str(), rel.replica_identity),
            (16384, "public", "t", b'd')
        );
        let cols: Vec<(bool, &str, u32, i32)> =
            rel.columns.iter().map(|c| (c.is_key, c.name.as_str(), c.type_oid, c.type_modifier)).collect();
        assert_eq!(cols, vec![(true, "id", 23, -1), (false, "v", 25, -1), (false, "n", 23, -1)]);

        let LogicalMessage::Relation(full) =
            one("52000040077075626c696300660066000201610000000017ffffffff01620000000019ffffffff", false)
        else {
            panic!("not a Relation")
        };
        assert_eq!(full.replica_identity, b'f');
        assert!(full.columns.iter().all(|c| c.is_key));
    }

    #[test]
    fn insert_update_delete() {
        assert_eq!(
            one("49000040004e000374000000013174000000036127626e", false),
            LogicalMessage::Insert { relation: 16384, new: vec![text("1"), text("a'b"), Value::Null] }
        );
        // Key change: the old key comes first.
        assert_eq!(
            one("55000040004b00037400000001316e6e4e00037400000001327400000001786e", false),
            LogicalMessage::Update {
                relation: 16384,
                old: Some(OldTuple::Key(vec![text("1"), Value::Null, Value::Null])),
                new: vec![text("2"), text("x"), Value::Null],
            }
        );
        assert_eq!(
            one("44000040004b00037400000001326e6e", false),
            LogicalMessage::Delete { relation: 16384, old: OldTuple::Key(vec![text("2"), Value::Null, Value::Null]) }
        );
        // REPLICA IDENTITY FULL: the whole old row.
        assert_eq!(
            one("55000040074f00027400000001317400000001714e0002740000000131740000000172", false),
            LogicalMessage::Update {
                relation: 16391,
                old: Some(OldTuple::Full(vec![text("1"), text("q")])),
                new: vec![text("1"), text("r")],
            }
        );
        assert_eq!(
            one("44000040074f0002740000000131740000000172", false),
            LogicalMessage::Delete { relation: 16391, old: OldTuple::Full(vec![text("1"), text("r")]) }
        );
    }

    #[test]
    fn truncate_and_message() {
        assert_eq!(
            one("5400000002020000400000004007", false),
            LogicalMessage::Truncate { options: TRUNCATE_RESTART_IDENTITY, relations: vec![16384, 16391] }
        );
        assert_eq!(
            one("4d010000000001532df0706678000000000568656c6c6f", false),
            LogicalMessage::Message {
                transactional: true,
                lsn: "0/1532DF0".parse().unwrap(),
                prefix: "pfx".into(),
                content: Bytes::from_static(b"hello"),
            }
        );
    }

    #[test]
    fn streamed_transactions() {
        assert_eq!(one("53000002d601", false), LogicalMessage::StreamStart { xid: 726, first: true });
        assert_eq!(one("45", false), LogicalMessage::StreamStop);
        // Inside a stream, data messages carry the transaction id first.
        let LogicalMessage::Relation(rel) = one(
            "52000002d6000040007075626c69630074006400030169640000000017ffffffff00760000000019ffffffff006e0000000017ffffffff",
            true,
        ) else {
            panic!("not a Relation")
        };
        assert_eq!(rel.id, 16384);
        let LogicalMessage::Insert { relation, new } =
            one("49000002d6000040004e0003740000000131740000000378787874000000023131", true)
        else {
            panic!("not an Insert")
        };
        assert_eq!((relation, new), (16384, vec![text("1"), text("xxx"), text("11")]));
        assert_eq!(one("41000002d6000002d7", false), LogicalMessage::StreamAbort { xid: 726, subxid: 727 });
        assert_eq!(
            one("63000002d60000000000016182a800000000016182d8000304322d8ded6c", false),
            LogicalMessage::StreamCommit {
                xid: 726,
                commit_lsn: "0/16182A8".parse().unwrap(),
                end_lsn: "0/16182D8".parse().unwrap(),
                commit_time: 0x304322d8ded6c,
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in ["", "42", "49000040004e0003", "5a", "55000040004b0001", "4900004000580000", "45ff"] {
            assert!(decode(&hex(bad), false).is_err(), "{bad:?} should not decode");
        }
        // Every truncation of a valid message fails cleanly.
        let full = hex("55000040074f00027400000001317400000001714e0002740000000131740000000172");
        for n in 0..full.len() {
            assert!(decode(&full.slice(..n), false).is_err());
        }
    }
}
