//! The little the server needs to know about SQL text, found by scanning it
//! (no parser): whether it may start `COPY ... FROM STDIN`, and whether it may
//! change session settings. Both answers err on the side of "yes": a false
//! "yes" costs an extra round trip, a false "no" would be a bug.

/// Whether the text mentions `stdin` anywhere (case-insensitive). Every
/// `COPY ... FROM STDIN` does; PL/pgSQL cannot copy from the client.
pub(crate) fn mentions_stdin(sql: &[u8]) -> bool {
    sql.windows(5).any(|w| w.eq_ignore_ascii_case(b"stdin"))
}

/// Whether running the text may change session-level settings: a statement
/// that starts with `SET`, `RESET` or `DISCARD`, or any call of `set_config`.
/// Settings changed inside functions or `DO` blocks by other means (e.g.
/// `EXECUTE 'SET ...'`) are not detected.
pub(crate) fn may_change_settings(sql: &[u8]) -> bool {
    if contains_ignore_case(sql, b"set_config") {
        return true;
    }
    statements(sql).any(|stmt| {
        let word = first_word(stmt);
        word.eq_ignore_ascii_case(b"set")
            || word.eq_ignore_ascii_case(b"reset")
            || word.eq_ignore_ascii_case(b"discard")
    })
}

/// The statements of a script, split at `;` (quotes are not understood, so a
/// `;` inside a literal splits too: harmless for the over-approximations here).
fn statements(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    sql.split(|&b| b == b';')
}

/// The first word of a statement, after whitespace and comments.
pub(crate) fn first_word(stmt: &[u8]) -> &[u8] {
    let rest = skip_space_and_comments(stmt);
    let end = rest.iter().position(|b| !b.is_ascii_alphanumeric() && *b != b'_').unwrap_or(rest.len());
    &rest[..end]
}

fn skip_space_and_comments(mut s: &[u8]) -> &[u8] {
    loop {
        let trimmed = s.trim_ascii_start();
        if let Some(rest) = trimmed.strip_prefix(b"--") {
            s = rest.iter().position(|&b| b == b'\n').map_or(&[][..], |i| &rest[i + 1..]);
        } else if let Some(rest) = trimmed.strip_prefix(b"/*") {
            s = rest.windows(2).position(|w| w == b"*/").map_or(&[][..], |i| &rest[i + 2..]);
        } else {
            return trimmed;
        }
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// Whether the whole text is one statement made of exactly these words
/// (case-insensitive, surrounding whitespace, comments and one `;` allowed),
/// e.g. `is_exactly(sql, &["discard", "all"])`.
pub(crate) fn is_exactly(sql: &[u8], words: &[&str]) -> bool {
    let mut rest = sql;
    for word in words {
        let w = first_word(rest);
        if !w.eq_ignore_ascii_case(word.as_bytes()) {
            return false;
        }
        let skipped = skip_space_and_comments(rest);
        rest = &skipped[w.len()..];
    }
    let rest = skip_space_and_comments(rest);
    let rest = rest.strip_prefix(b";").unwrap_or(rest);
    let rest = skip_space_and_comments(rest);
    rest.is_empty() || rest == b"\0"
}

/// If the text is one plain `BEGIN` (`BEGIN`, `BEGIN WORK`, `BEGIN
/// TRANSACTION`, `START TRANSACTION`, no options): its command tag.
pub(crate) fn plain_begin(sql: &[u8]) -> Option<&'static str> {
    let begin = [&["begin"][..], &["begin", "work"], &["begin", "transaction"]];
    if begin.iter().any(|words| is_exactly(sql, words)) {
        Some("BEGIN")
    } else if is_exactly(sql, &["start", "transaction"]) {
        Some("START TRANSACTION")
    } else {
        None
    }
}

/// Whether one of the statements of a script is exactly these words.
pub(crate) fn has_statement(sql: &[u8], words: &[&str]) -> bool {
    statements(sql).any(|stmt| is_exactly(stmt, words))
}

/// A `LISTEN`/`UNLISTEN` found in a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listening {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

/// The `LISTEN` and `UNLISTEN` statements of a script, with their channel
/// names as PostgreSQL folds them (unquoted: lower case).
pub(crate) fn listen_commands(sql: &[u8]) -> Vec<Listening> {
    statements(sql)
        .filter_map(|stmt| {
            let word = first_word(stmt);
            let listen = word.eq_ignore_ascii_case(b"listen");
            if !listen && !word.eq_ignore_ascii_case(b"unlisten") {
                return None;
            }
            let rest = skip_space_and_comments(stmt);
            let rest = skip_space_and_comments(&rest[word.len()..]);
            if !listen && rest.starts_with(b"*") {
                return Some(Listening::UnlistenAll);
            }
            let channel = identifier(rest)?;
            Some(if listen { Listening::Listen(channel) } else { Listening::Unlisten(channel) })
        })
        .collect()
}

/// An identifier at the start of `s`: `"quoted"` kept as is (`""` is a
/// quote), unquoted folded to lower case.
fn identifier(s: &[u8]) -> Option<String> {
    if let Some(rest) = s.strip_prefix(b"\"") {
        let mut name = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            if rest[i] == b'"' {
                if rest.get(i + 1) == Some(&b'"') {
                    name.push(b'"');
                    i += 2;
                    continue;
                }
                return String::from_utf8(name).ok();
            }
            name.push(rest[i]);
            i += 1;
        }
        return None;
    }
    let end = s
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || *b >= 0x80))
        .unwrap_or(s.len());
    (end > 0).then(|| String::from_utf8_lossy(&s[..end]).to_lowercase())
}

/// A SQL-level prepared statement or cursor that a script creates or drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SqlName {
    Prepare(String),
    Deallocate(String),
    /// `DECLARE name ... WITH HOLD` (others end with their transaction).
    DeclareHold(String),
    Close(String),
}

/// The `PREPARE`, `DEALLOCATE`, `DECLARE ... WITH HOLD` and `CLOSE`
/// statements of a script, with their names as PostgreSQL folds them
/// (`DEALLOCATE ALL` and `CLOSE ALL` are not names).
pub(crate) fn sql_names(sql: &[u8]) -> Vec<SqlName> {
    statements(sql)
        .filter_map(|stmt| {
            let word = first_word(stmt).to_ascii_lowercase();
            let kind = match word.as_slice() {
                b"prepare" | b"deallocate" | b"declare" | b"close" => word,
                _ => return None,
            };
            let rest = skip_space_and_comments(stmt);
            let mut rest = skip_space_and_comments(&rest[kind.len()..]);
            if kind == b"deallocate" && first_word(rest).eq_ignore_ascii_case(b"prepare") {
                rest = skip_space_and_comments(&rest[7..]);
            }
            let name = identifier(rest)?;
            if (kind == b"deallocate" || kind == b"close") && name == "all" && !rest.starts_with(b"\"") {
                return None;
            }
            Some(match kind.as_slice() {
                b"prepare" => SqlName::Prepare(name),
                b"deallocate" => SqlName::Deallocate(name),
                b"declare" if contains_ignore_case(stmt, b"hold") => SqlName::DeclareHold(name),
                b"declare" => return None,
                _ => SqlName::Close(name),
            })
        })
        .collect()
}

/// `name` as a quoted identifier (libpq's `PQescapeIdentifier`).
pub(crate) use postgres_protocol::escape::escape_identifier as quote_identifier;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_copy_from_stdin() {
        assert!(mentions_stdin(b"COPY t FROM STDIN"));
        assert!(mentions_stdin(b"copy t (a, b) from stdin with (format csv)"));
        assert!(!mentions_stdin(b"COPY t TO STDOUT"));
    }

    #[test]
    fn detects_setting_changes_but_not_update_set() {
        assert!(may_change_settings(b"SET work_mem = '8MB'"));
        assert!(may_change_settings(b"  -- comment\n/* c */ set TimeZone to 'UTC'"));
        assert!(may_change_settings(b"BEGIN; SET LOCAL x = 1; COMMIT"));
        assert!(may_change_settings(b"select pg_catalog.SET_CONFIG('a', 'b', false)"));
        assert!(may_change_settings(b"RESET ALL"));
        assert!(may_change_settings(b"DISCARD ALL"));
        assert!(!may_change_settings(b"UPDATE t SET a = 1 WHERE id = 2"));
        assert!(!may_change_settings(b"SELECT settings FROM t"));
    }

    #[test]
    fn finds_listen_and_unlisten() {
        assert_eq!(
            listen_commands(b"LISTEN Orders; unlisten \"Mixed\"\"Case\"; UNLISTEN *; SELECT 1"),
            vec![Listening::Listen("orders".into()), Listening::Unlisten("Mixed\"Case".into()), Listening::UnlistenAll]
        );
        assert!(listen_commands(b"SELECT 'listen x'").is_empty());
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn finds_sql_level_statement_and_cursor_names() {
        assert_eq!(
            sql_names(b"PREPARE Foo (int) AS SELECT $1; EXECUTE foo(1); DEALLOCATE PREPARE \"X\"; DEALLOCATE ALL"),
            vec![SqlName::Prepare("foo".into()), SqlName::Deallocate("X".into())]
        );
        assert_eq!(
            sql_names(
                b"DECLARE c1 CURSOR FOR SELECT 1; declare \"c2\" cursor with hold for select 2; CLOSE c2; close all"
            ),
            vec![SqlName::DeclareHold("c2".into()), SqlName::Close("c2".into())]
        );
    }

    #[test]
    fn finds_plain_begin_only() {
        assert_eq!(plain_begin(b"BEGIN;"), Some("BEGIN"));
        assert_eq!(plain_begin(b" begin work \0"), Some("BEGIN"));
        assert_eq!(plain_begin(b"BEGIN TRANSACTION"), Some("BEGIN"));
        assert_eq!(plain_begin(b"start transaction;"), Some("START TRANSACTION"));
        assert_eq!(plain_begin(b"BEGIN ISOLATION LEVEL SERIALIZABLE"), None);
        assert_eq!(plain_begin(b"BEGIN; SELECT 1"), None);
        assert_eq!(plain_begin(b"START TRANSACTION READ ONLY"), None);
        assert_eq!(plain_begin(b"BEGINNING"), None);
    }

    #[test]
    fn matches_whole_statements() {
        assert!(is_exactly(b"discard ALL;", &["discard", "all"]));
        assert!(is_exactly(b" DEALLOCATE  all \n", &["deallocate", "all"]));
        assert!(!is_exactly(b"DISCARD ALL; SELECT 1", &["discard", "all"]));
        assert!(!is_exactly(b"DISCARD PLANS", &["discard", "all"]));
        assert!(has_statement(b"SELECT 1; discard all; SELECT 2", &["discard", "all"]));
        assert!(!has_statement(b"SELECT 'discard all'", &["discard", "all"]));
    }
}
