//! Named prepared statements for the apply's small local transactions.
//!
//! A stream of small remote transactions makes the same few statements over
//! and over (the settings, one group statement per table and kind, the
//! stored-LSN update): their SQL depends on the table's columns, not on the
//! rows. Parsing and planning them each time was most of the engine's time
//! per transaction, so each distinct text is parsed once under a name and
//! then only bound and executed, with a generic plan (the settings force it:
//! a custom plan would be re-planned every time for these statements).
//!
//! The statements live in the engine's one session, which wire clients
//! share: names carry a prefix of their own (the wire server renames its
//! clients' statements and keeps their `DEALLOCATE ALL` to their own). If
//! one disappears anyway (an embedding program's `DEALLOCATE ALL`, an engine
//! restart), the round trip fails as a whole (one implicit transaction, so
//! nothing of it is committed) and is sent again with every statement parsed
//! afresh. They are closed when the apply session ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use crate::error::SqlState;
use crate::params::Param;
use crate::{Instance, RawSession, protocol};

/// Most statements kept; past it, all are closed and parsed again as needed
/// (texts change only with the tables' columns, so this is rarely reached).
const MAX_STATEMENTS: usize = 256;

/// Names are unique in the process, so a session's statements never meet
/// those of an earlier session on the same instance.
static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

/// Runs batches of statements through named prepared statements.
pub(super) struct Prepared {
    session: RawSession,
    /// Statement text -> parameter types it was parsed with, and its name.
    names: HashMap<String, (Vec<u32>, String)>,
    /// Names that may exist in the engine but are not in `names` (parsed in
    /// a failed round trip): closed with the next one.
    stale: Vec<String>,
}

impl Prepared {
    pub(super) fn new(instance: &Instance) -> Prepared {
        Prepared { session: instance.raw_session(), names: HashMap::new(), stale: Vec::new() }
    }

    /// Runs `statements` as one implicit transaction in one round trip
    /// (all or nothing, like [`Instance::transaction`]).
    pub(super) async fn transaction(&mut self, statements: &[(String, Vec<Param>)]) -> Result<(), crate::Error> {
        match self.run(statements).await {
            Err(e) if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) => {
                tracing::debug!("prepared apply statements were dropped; parsing them again");
                self.stale.extend(self.names.drain().map(|(_, (_, name))| name));
                self.run(statements).await
            }
            other => other,
        }
    }

    async fn run(&mut self, statements: &[(String, Vec<Param>)]) -> Result<(), crate::Error> {
        let mut buf = BytesMut::new();
        if self.names.len() + statements.len() > MAX_STATEMENTS {
            self.stale.extend(self.names.drain().map(|(_, (_, name))| name));
        }
        for name in std::mem::take(&mut self.stale) {
            frontend::close(b'S', &name, &mut buf).map_err(io_err)?;
        }
        // Parsed in this round trip: (text, types, name).
        let mut parsed: Vec<(String, Vec<u32>, String)> = Vec::new();
        for (sql, params) in statements {
            let same_types = |types: &[u32]| types.iter().copied().eq(params.iter().map(Param::type_oid));
            let known = match self.names.get(sql.as_str()) {
                Some((types, name)) if same_types(types) => Some(name.as_str()),
                _ => parsed.iter().find(|(s, t, _)| s == sql && same_types(t)).map(|p| p.2.as_str()),
            };
            if let Some(name) = known {
                bind_execute(name, params, &mut buf)?;
                continue;
            }
            let name = format!("pglite_cache_apply_{}", NEXT_NAME.fetch_add(1, Ordering::Relaxed));
            let types: Vec<u32> = params.iter().map(Param::type_oid).collect();
            frontend::parse(&name, sql, types.iter().copied(), &mut buf).map_err(io_err)?;
            bind_execute(&name, params, &mut buf)?;
            parsed.push((sql.clone(), types, name));
        }
        protocol::sync(&mut buf);
        let reply = protocol::decode(&self.session.round_trip(buf).await?)?;
        match reply.error {
            Some(e) => {
                // Statements parsed before the error exist: close them next time.
                self.stale.extend(parsed.into_iter().map(|(_, _, name)| name));
                Err(e.into())
            }
            None => {
                if !parsed.is_empty() {
                    for (sql, types, name) in parsed {
                        if let Some((_, replaced)) = self.names.insert(sql, (types, name)) {
                            self.stale.push(replaced);
                        }
                    }
                    self.close_on_drop();
                }
                Ok(())
            }
        }
    }

    /// When the session ends, its statements are closed (queued behind
    /// other callers' work, like any call).
    fn close_on_drop(&mut self) {
        let mut buf = BytesMut::new();
        for name in self.names.values().map(|(_, name)| name).chain(&self.stale) {
            // Cannot fail: names have no NUL byte.
            let _ = frontend::close(b'S', name, &mut buf);
        }
        protocol::sync(&mut buf);
        self.session.on_drop(buf);
    }
}

fn io_err(e: std::io::Error) -> crate::Error {
    crate::Error::Protocol(e.to_string())
}

/// `Bind` (unnamed portal, text format in and out) and `Execute`.
fn bind_execute(name: &str, params: &[Param], buf: &mut BytesMut) -> Result<(), crate::Error> {
    protocol::bind_text(name, params, buf)?;
    frontend::execute("", 0, buf).map_err(io_err)
}
