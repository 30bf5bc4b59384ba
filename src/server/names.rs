//! Per-connection names for prepared statements and portals.
//!
//! All clients share one backend, so the names they choose (tokio-postgres
//! uses `s0, s1, ...` on every connection, sqlx `sqlx_s_1, ...`) would
//! collide. Every named statement and portal in `Parse`, `Bind`, `Describe`,
//! `Close` and `Execute` is rewritten to a name private to the connection;
//! the unnamed statement and portal (`""`) are left alone, since their
//! lifetime ends with the next unnamed `Parse`/`Bind` of the same batch.

use bytes::{BufMut, BytesMut};

use super::frame::Frame;

/// PostgreSQL truncates identifiers (and statement/portal names) to 63 bytes.
const MAX_NAME: usize = 63;

/// A message that names a statement or portal, decoded just enough to rename it.
#[derive(Debug)]
pub(crate) enum Named<'a> {
    Parse {
        statement: &'a [u8],
        sql: &'a [u8],
        rest: &'a [u8],
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
        rest: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        rest: &'a [u8],
    },
    /// `Describe` or `Close` of a statement (`S`) or portal (`P`).
    Target {
        kind: u8,
        name: &'a [u8],
    },
}

/// A message body that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid {0} message")]
pub(crate) struct Malformed(pub &'static str);

fn cstr<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), Malformed> {
    let end = body.iter().position(|&b| b == 0).ok_or(Malformed(what))?;
    Ok((&body[..end], &body[end + 1..]))
}

impl<'a> Named<'a> {
    /// Decodes `P`, `B`, `E`, `D` and `C` messages; `None` for other tags.
    pub fn parse(frame: &'a Frame) -> Result<Option<Named<'a>>, Malformed> {
        let body = frame.body();
        Ok(Some(match frame.tag {
            b'P' => {
                let (statement, rest) = cstr(body, "Parse")?;
                let (sql, rest) = cstr(rest, "Parse")?;
                Named::Parse { statement, sql, rest }
            }
            b'B' => {
                let (portal, rest) = cstr(body, "Bind")?;
                let (statement, rest) = cstr(rest, "Bind")?;
                Named::Bind { portal, statement, rest }
            }
            b'E' => {
                let (portal, rest) = cstr(body, "Execute")?;
                Named::Execute { portal, rest }
            }
            b'D' | b'C' => {
                let what = if frame.tag == b'D' { "Describe" } else { "Close" };
                let (&kind, rest) = body.split_first().ok_or(Malformed(what))?;
                if kind != b'S' && kind != b'P' {
                    return Err(Malformed(what));
                }
                let (name, rest) = cstr(rest, what)?;
                if !rest.is_empty() {
                    return Err(Malformed(what));
                }
                Named::Target { kind, name }
            }
            _ => return Ok(None),
        }))
    }
}

/// Maps a connection's statement and portal names to engine-wide ones.
#[derive(Debug, Clone)]
pub(crate) struct Namer {
    prefix: String,
}

impl Namer {
    /// Names for connection `id`.
    pub fn new(id: u32) -> Self {
        Namer { prefix: format!("pgc{id}_") }
    }

    /// The engine's name for a client's name: the prefix plus the name, or,
    /// when that would exceed PostgreSQL's 63-byte limit, the prefix plus a
    /// hash of the full name (so long names that differ only at the end stay
    /// distinct). The unnamed `""` stays unnamed.
    pub fn engine_name(&self, name: &[u8], out: &mut BytesMut) {
        if name.is_empty() {
            return;
        }
        out.put_slice(self.prefix.as_bytes());
        if self.prefix.len() + name.len() <= MAX_NAME {
            out.put_slice(name);
        } else {
            out.put_slice(format!("h{:016x}", fnv1a(name)).as_bytes());
        }
    }

    /// Re-encodes a message with engine names.
    pub fn rewrite(&self, tag: u8, named: &Named<'_>, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(tag);
        out.put_i32(0); // length, patched below
        match named {
            Named::Parse { statement, sql, rest } => {
                self.put_name(statement, out);
                out.put_slice(sql);
                out.put_u8(0);
                out.put_slice(rest);
            }
            Named::Bind { portal, statement, rest } => {
                self.put_name(portal, out);
                self.put_name(statement, out);
                out.put_slice(rest);
            }
            Named::Execute { portal, rest } => {
                self.put_name(portal, out);
                out.put_slice(rest);
            }
            Named::Target { kind, name } => {
                out.put_u8(*kind);
                self.put_name(name, out);
            }
        }
        let len = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    }

    fn put_name(&self, name: &[u8], out: &mut BytesMut) {
        self.engine_name(name, out);
        out.put_u8(0);
    }
}

/// FNV-1a, 64 bits: stable across runs and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut bytes = BytesMut::new();
        bytes.put_u8(tag);
        bytes.put_i32(body.len() as i32 + 4);
        bytes.put_slice(body);
        Frame { tag, bytes }
    }

    #[test]
    fn renames_named_statements_and_portals_only() {
        let namer = Namer::new(7);
        let bind = frame(b'B', b"p1\0s0\0\0\0\0\0\0\0");
        let named = Named::parse(&bind).unwrap().unwrap();
        let mut out = BytesMut::new();
        namer.rewrite(b'B', &named, &mut out);
        assert_eq!(&out[..], &frame(b'B', b"pgc7_p1\0pgc7_s0\0\0\0\0\0\0\0").bytes[..]);

        let parse = frame(b'P', b"\0SELECT 1\0\0\0");
        let named = Named::parse(&parse).unwrap().unwrap();
        let mut out = BytesMut::new();
        namer.rewrite(b'P', &named, &mut out);
        assert_eq!(&out[..], &parse.bytes[..], "the unnamed statement keeps its name");

        let close = frame(b'C', b"Ss0\0");
        let named = Named::parse(&close).unwrap().unwrap();
        let mut out = BytesMut::new();
        namer.rewrite(b'C', &named, &mut out);
        assert_eq!(&out[..], &frame(b'C', b"Spgc7_s0\0").bytes[..]);
    }

    #[test]
    fn long_names_are_hashed_within_the_limit() {
        let namer = Namer::new(1);
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        namer.engine_name(&[b'x'; 80], &mut a);
        let mut other = vec![b'x'; 79];
        other.push(b'y');
        namer.engine_name(&other, &mut b);
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME);
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(Named::parse(&frame(b'P', b"abc")).is_err());
        assert!(Named::parse(&frame(b'D', b"Xs\0")).is_err());
        assert!(Named::parse(&frame(b'C', b"")).is_err());
    }
}
