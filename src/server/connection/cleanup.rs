//! Nothing outlives its client: what a connection created in the shared
//! backend is closed when it ends (and by `DISCARD ALL`).

use bytes::BytesMut;

use super::Connection;
use crate::server::backend;
use crate::server::sql_text::{self, SqlName};

impl<S> Connection<S> {
    /// Frontend messages that close what this connection created in the
    /// shared backend: its protocol statements (and portals), SQL-level
    /// prepared statements, and with `everything` its `WITH HOLD` cursors and
    /// the LISTENs nobody else needs. Ends with `Sync`; forgets it all.
    pub(super) fn close_own(&mut self, everything: bool, out: &mut BytesMut) {
        self.namer.close_all(out);
        self.stdin_statements.clear();
        self.stdin_portals.clear();
        self.quiet_statements.clear();
        self.quiet_portals.clear();
        self.copy_statements.clear();
        self.copy_portals.clear();
        self.begin_statements.clear();
        for name in self.sql_statements.drain() {
            backend::close(b'S', name.as_bytes(), out);
        }
        if everything {
            for name in self.sql_cursors.drain() {
                backend::close(b'P', name.as_bytes(), out);
            }
        }
        backend::sync(out);
        if everything {
            let abandoned = self.hub.unlisten_all(self.id);
            if !abandoned.is_empty() {
                let sql: Vec<String> =
                    abandoned.iter().map(|c| format!("UNLISTEN {}", sql_text::quote_identifier(c))).collect();
                backend::query(&sql.join("; "), out);
            }
        }
    }

    /// Notes the SQL-level names a batch created or dropped, once its reply
    /// is known (a failed `PREPARE` created nothing: its name may be another
    /// client's).
    pub(super) fn note_sql_names(&mut self, names: Vec<SqlName>, failed: bool) {
        for name in names {
            match name {
                SqlName::Prepare(n) if !failed => {
                    self.sql_statements.insert(n);
                }
                SqlName::DeclareHold(n) if !failed => {
                    self.sql_cursors.insert(n);
                }
                SqlName::Deallocate(n) => {
                    self.sql_statements.remove(&n);
                }
                SqlName::Close(n) => {
                    self.sql_cursors.remove(&n);
                }
                SqlName::Prepare(_) | SqlName::DeclareHold(_) => {}
            }
        }
    }
}

/// Whatever way the connection ends (the client leaves, a protocol error, its
/// task aborted at shutdown), what it created in the shared backend goes:
/// its transaction is rolled back, its settings reset, its statements,
/// cursors and LISTENs closed. The session sends these messages when it is
/// dropped, right after this (on its lease if it holds the engine, else
/// queued like any other call).
impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        let mut bytes = BytesMut::new();
        if self.session.holds_engine() {
            let rollback = if self.session.is_idle() { "" } else { "ROLLBACK; " };
            backend::query(&format!("{rollback}RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE"), &mut bytes);
        }
        self.close_own(true, &mut bytes);
        if !bytes.is_empty() {
            self.session.on_drop(bytes);
        }
    }
}
