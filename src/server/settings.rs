//! Keeping one client's `SET` from applying to the others.
//!
//! All clients share one backend, so a session setting changed by one client
//! would otherwise stay in force for every later statement of every client
//! (and for the Rust API). The rule kept here: **between the busy periods of
//! a connection that has session settings, the engine runs with the server's
//! defaults.** A connection that may change settings (its SQL starts with
//! `SET`/`RESET`/`DISCARD` or calls `set_config`, see
//! [`may_change_settings`](super::sql_text::may_change_settings)), or that
//! already has some, holds the engine for its whole busy period:
//!
//! 1. its saved settings are applied (`set_config(name, value, false)`);
//! 2. its statements run, up to the point the engine is idle again;
//! 3. the settings now in force with source `session` (and `role`) are saved
//!    for the connection, and `RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE` restores the defaults.
//!
//! Connections without session settings pay nothing. `ParameterStatus`
//! messages caused by steps 1 and 3 are not forwarded (the client already
//! knows its own values).

use bytes::BytesMut;

use postgres_protocol::escape::escape_literal as literal; // libpq's PQescapeLiteral

use super::backend;
use crate::{Error, RawSession};

/// The settings of one connection, saved while it does not hold the engine.
#[derive(Debug, Default)]
pub(crate) struct SessionSettings {
    saved: Vec<(String, String)>,
    /// The saved settings are in force on the engine right now.
    applied: bool,
}

/// `name, value` of every setting changed in this session, and the role.
const CAPTURE: &str = "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
     WHERE source = 'session' AND name <> 'role' \
     UNION ALL SELECT 'role', pg_catalog.current_setting('role') WHERE pg_catalog.current_setting('role') <> 'none'; \
     RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE";

impl SessionSettings {
    /// Settings from the startup packet that differ from the server defaults
    /// in a way that matters (`application_name` is only reported, and
    /// `extra_float_digits > 0` all mean "shortest exact" since PostgreSQL 12).
    pub fn from_startup(settings: &[(String, String)], defaults: &[(String, String)]) -> SessionSettings {
        let default = |name: &str| defaults.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        let same = |a: &str, b: &str| {
            let norm = |s: &str| {
                s.chars().filter(|c| !c.is_whitespace() && *c != '-').collect::<String>().to_ascii_lowercase()
            };
            norm(a) == norm(b)
        };
        let saved = settings
            .iter()
            .filter(|(name, value)| match name.to_ascii_lowercase().as_str() {
                "application_name" => false,
                "client_encoding" => !(same(value, "UTF8") || same(value, "unicode")),
                "datestyle" => !(same(value, "ISO") || default("DateStyle").is_some_and(|d| same(value, d))),
                "extra_float_digits" => value.trim().parse::<i32>().map_or(true, |v| v <= 0),
                _ => !default(name).is_some_and(|d| same(value, d)),
            })
            .cloned()
            .collect();
        SessionSettings { saved, applied: false }
    }

    /// Whether the connection must hold the engine for its next busy period.
    pub fn needs_hold(&self, batch_may_change: bool) -> bool {
        batch_may_change || self.applied || !self.saved.is_empty()
    }

    /// Whether the saved settings are in force on the engine.
    pub fn applied(&self) -> bool {
        self.applied
    }

    /// Forgets the saved settings (after `DISCARD ALL` / `RESET ALL` outside
    /// a busy period).
    pub fn clear(&mut self) {
        self.saved.clear();
    }

    /// Puts the connection's settings in force. The session must hold the
    /// engine. A database error (e.g. an invalid value from the startup
    /// packet) is returned as such.
    pub async fn apply(&mut self, session: &mut RawSession) -> Result<(), Error> {
        if self.applied {
            return Ok(());
        }
        self.applied = true;
        if self.saved.is_empty() {
            return Ok(());
        }
        let calls: Vec<String> = self
            .saved
            .iter()
            .map(|(name, value)| format!("pg_catalog.set_config({}, {}, false)", literal(name), literal(value)))
            .collect();
        let mut bytes = BytesMut::new();
        backend::query(&format!("SELECT {}", calls.join(", ")), &mut bytes);
        let reply = session.round_trip(bytes).await?;
        crate::protocol::decode(&reply)?.into_results()?;
        Ok(())
    }

    /// Saves the settings now in force and restores the defaults. The
    /// session must hold the engine, idle.
    pub async fn capture_and_reset(&mut self, session: &mut RawSession) -> Result<(), Error> {
        let mut bytes = BytesMut::new();
        backend::query(CAPTURE, &mut bytes);
        let reply = session.round_trip(bytes).await?;
        let results = crate::protocol::decode(&reply)?.into_results()?;
        self.saved = results
            .first()
            .map(|r| r.rows.iter().map(|row| (row.get::<String>(0), row.get::<String>(1))).collect())
            .unwrap_or_default();
        self.applied = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn startup_defaults_do_not_make_a_connection_stateful() {
        let defaults = pairs(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"), ("client_encoding", "UTF8")]);
        let s = SessionSettings::from_startup(
            &pairs(&[
                ("client_encoding", "utf-8"),
                ("DateStyle", "ISO"),
                ("TimeZone", "UTC"),
                ("extra_float_digits", "2"),
                ("application_name", "psql"),
            ]),
            &defaults,
        );
        assert!(!s.needs_hold(false));
        let s = SessionSettings::from_startup(&pairs(&[("TimeZone", "Europe/Paris")]), &defaults);
        assert!(s.needs_hold(false));
    }

    #[test]
    fn quotes_literals() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("C:\\dir"), " E'C:\\\\dir'");
    }
}
