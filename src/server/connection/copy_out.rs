//! `COPY ... TO STDOUT` in bounded memory.
//!
//! The engine runs a COPY to its end inside one call and returns all of its
//! output at once. So the server runs the rows of a COPY it understands as a
//! query instead, in chunks (see `chunks.rs`), and writes the COPY format
//! itself: `COPY (query) TO STDOUT` and `COPY table [(columns)] TO STDOUT`
//! (a plain table: the catalog gives the columns COPY would use), in text,
//! CSV or binary format with default options (`HEADER` allowed). Anything
//! else (other options, a view, a statement this scanner does not follow)
//! runs as it is, unbounded. Pure logic here; the driving is in `mod.rs`.

use bytes::{BufMut, BytesMut};

/// The output formats written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Text { header: bool },
    Csv { header: bool },
    Binary,
}

/// What rows a COPY writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    /// The query, with everything else of the statement blanked out (so that
    /// an error's position in it is the position in the statement).
    Query(Vec<u8>),
    /// A table name and column list as written.
    Table { name: String, columns: Option<Vec<String>> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CopyTo {
    pub source: Source,
    pub format: Format,
}

/// Tokens of the statement: enough to find its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    Quoted(&'a [u8]),
    Punct(u8),
    Other,
}

/// Splits SQL into tokens with their byte ranges; `None` if it is not
/// plainly tokenizable here (unterminated quotes or comments).
fn tokens(sql: &[u8]) -> Option<Vec<(Token<'_>, usize, usize)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sql.len() {
        let c = sql[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if sql[i..].starts_with(b"--") {
            i = sql[i..].iter().position(|&b| b == b'\n').map_or(sql.len(), |p| i + p + 1);
            continue;
        }
        if sql[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < sql.len() {
                if sql[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if sql[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            if depth != 0 {
                return None;
            }
            continue;
        }
        if c == b'\'' || c == b'"' {
            // E'...' strings with backslashes are not followed: refuse them.
            if c == b'\'' && start > 0 && sql[start - 1].eq_ignore_ascii_case(&b'e') {
                return None;
            }
            i += 1;
            loop {
                let p = sql[i..].iter().position(|&b| b == c)?;
                i += p + 1;
                if sql.get(i) == Some(&c) {
                    i += 1; // doubled quote
                } else {
                    break;
                }
            }
            let token = if c == b'"' { Token::Quoted(&sql[start..i]) } else { Token::Other };
            out.push((token, start, i));
            continue;
        }
        if c == b'$' {
            // $tag$ ... $tag$ (a $n parameter is refused by the caller's checks).
            let end = sql[i + 1..].iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))? + i + 1;
            if sql[end] != b'$' {
                return None;
            }
            let tag = &sql[i..=end];
            let close = sql[end + 1..].windows(tag.len()).position(|w| w == tag)?;
            i = end + 1 + close + tag.len();
            out.push((Token::Other, start, i));
            continue;
        }
        if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            while i < sql.len()
                && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_' || sql[i] == b'$' || sql[i] >= 0x80)
            {
                i += 1;
            }
            out.push((Token::Word(&sql[start..i]), start, i));
            continue;
        }
        out.push((Token::Punct(c), start, i + 1));
        i += 1;
    }
    Some(out)
}

fn is_word(token: &Token<'_>, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.eq_ignore_ascii_case(word.as_bytes()))
}

/// Recognizes a `COPY ... TO STDOUT` this module can run in chunks.
pub(super) fn parse(sql: &[u8]) -> Option<CopyTo> {
    let tokens = tokens(sql)?;
    let mut at = 0;
    if !is_word(&tokens.first()?.0, "copy") {
        return None;
    }
    at += 1;
    let source = if tokens.get(at)?.0 == Token::Punct(b'(') {
        let close = matching(&tokens, at)?;
        let (_, inner_start, _) = tokens[at + 1];
        let (_, inner_end, _) = tokens[close];
        let first = &tokens.get(at + 1)?.0;
        if !["select", "with", "values", "table"].iter().any(|w| is_word(first, w)) {
            return None;
        }
        // Blank out all but the query, one space per character.
        let mut query = Vec::with_capacity(sql.len());
        for (i, &b) in sql.iter().enumerate() {
            if (inner_start..inner_end).contains(&i) {
                query.push(b);
            } else if b & 0xC0 != 0x80 {
                query.push(b' ');
            }
        }
        at = close + 1;
        Source::Query(query)
    } else {
        // [schema.]name, each part a word or a quoted identifier.
        let name_start = tokens[at].1;
        let mut name_end;
        loop {
            match tokens.get(at)?.0 {
                Token::Word(_) | Token::Quoted(_) => name_end = tokens[at].2,
                _ => return None,
            }
            at += 1;
            if tokens.get(at)?.0 == Token::Punct(b'.') {
                at += 1;
            } else {
                break;
            }
        }
        let name = String::from_utf8(sql[name_start..name_end].to_vec()).ok()?;
        let columns = if tokens.get(at)?.0 == Token::Punct(b'(') {
            let close = matching(&tokens, at)?;
            let mut columns = Vec::new();
            for (i, (token, _, _)) in tokens[at + 1..close].iter().enumerate() {
                match (i % 2, token) {
                    (0, Token::Word(w)) => columns.push(String::from_utf8(w.to_ascii_lowercase()).ok()?),
                    (0, Token::Quoted(q)) => {
                        let inner = &q[1..q.len() - 1];
                        columns.push(String::from_utf8(inner.to_vec()).ok()?.replace("\"\"", "\""));
                    }
                    (1, Token::Punct(b',')) => {}
                    _ => return None,
                }
            }
            at = close + 1;
            Some(columns)
        } else {
            None
        };
        Source::Table { name, columns }
    };
    if !is_word(&tokens.get(at)?.0, "to") || !is_word(&tokens.get(at + 1)?.0, "stdout") {
        return None;
    }
    at += 2;
    let format = options(&tokens[at..])?;
    Some(CopyTo { source, format })
}

/// The index of the `)` matching the `(` at `open`.
fn matching(tokens: &[(Token<'_>, usize, usize)], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (i, (token, _, _)) in tokens.iter().enumerate().skip(open) {
        match token {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `[WITH] (FORMAT x [, HEADER [bool]])`, `[WITH] CSV [HEADER]`, `[WITH]
/// BINARY` or nothing, then an optional `;`.
fn options(tokens: &[(Token<'_>, usize, usize)]) -> Option<Format> {
    let mut rest: Vec<Token<'_>> = tokens.iter().map(|t| t.0).collect();
    if rest.last() == Some(&Token::Punct(b';')) {
        rest.pop();
    }
    if rest.first().is_some_and(|t| is_word(t, "with")) {
        rest.remove(0);
    }
    let (mut format, mut header) = ("text", false);
    match rest.as_slice() {
        [] => {}
        [Token::Punct(b'('), inner @ .., Token::Punct(b')')] => {
            for option in inner.split(|t| *t == Token::Punct(b',')) {
                match option {
                    [name, value] if is_word(name, "format") => {
                        format = ["text", "csv", "binary"].into_iter().find(|f| is_word(value, f))?;
                    }
                    [name] if is_word(name, "header") => header = true,
                    [name, value] if is_word(name, "header") => {
                        header = ["true", "on"].iter().any(|v| is_word(value, v));
                        if !header && !["false", "off"].iter().any(|v| is_word(value, v)) {
                            return None;
                        }
                    }
                    _ => return None,
                }
            }
        }
        [csv] if is_word(csv, "csv") => format = "csv",
        [csv, h] if is_word(csv, "csv") && is_word(h, "header") => (format, header) = ("csv", true),
        [binary] if is_word(binary, "binary") => format = "binary",
        _ => return None,
    }
    match (format, header) {
        ("text", header) => Some(Format::Text { header }),
        ("csv", header) => Some(Format::Csv { header }),
        ("binary", false) => Some(Format::Binary),
        _ => None, // PostgreSQL's own error for HEADER with binary
    }
}

/// The catalog query that lists a table's columns for COPY: one row per
/// column (name, generated), none if it is not a plain table.
pub(super) fn columns_query(name: &str) -> String {
    format!(
        "SELECT a.attname, a.attgenerated <> '' FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         WHERE c.oid = pg_catalog.to_regclass('{}') AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
        name.replace('\'', "''")
    )
}

/// The query that gives the rows of `COPY table [(columns)]`, from the
/// table's columns (name, generated); `None` if a listed column does not
/// exist or is generated (then the statement runs as it is, for
/// PostgreSQL's own error).
pub(super) fn table_query(name: &str, listed: Option<&[String]>, catalog: &[(String, bool)]) -> Option<String> {
    let columns: Vec<&str> = match listed {
        Some(listed) => {
            for column in listed {
                if !catalog.iter().any(|(c, generated)| c == column && !generated) {
                    return None;
                }
            }
            listed.iter().map(String::as_str).collect()
        }
        None => catalog.iter().filter(|(_, generated)| !generated).map(|(c, _)| c.as_str()).collect(),
    };
    if columns.is_empty() {
        return None;
    }
    let quoted: Vec<String> = columns.iter().map(|c| crate::server::sql_text::quote_identifier(c)).collect();
    Some(format!("SELECT {} FROM ONLY {name}", quoted.join(", ")))
}

/// `CopyOutResponse` for `columns` columns.
pub(super) fn copy_out_response(format: Format, columns: usize, out: &mut BytesMut) {
    let code = i16::from(format == Format::Binary);
    out.put_u8(b'H');
    out.put_i32((4 + 1 + 2 + 2 * columns) as i32);
    out.put_i8(code as i8);
    out.put_i16(columns as i16);
    for _ in 0..columns {
        out.put_i16(code);
    }
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The start of the data: the binary signature, or a header line.
pub(super) fn prologue(format: Format, names: &[String], out: &mut BytesMut) {
    let line = match format {
        Format::Binary => {
            copy_data(out, |out| out.put_slice(BINARY_SIGNATURE));
            return;
        }
        Format::Text { header: true } | Format::Csv { header: true } => names,
        _ => return,
    };
    let values: Vec<Option<&[u8]>> = line.iter().map(|n| Some(n.as_bytes())).collect();
    row(format, &values, out);
}

/// One row as `CopyData`.
pub(super) fn row(format: Format, values: &[Option<&[u8]>], out: &mut BytesMut) {
    copy_data(out, |out| match format {
        Format::Binary => {
            out.put_i16(values.len() as i16);
            for value in values {
                match value {
                    Some(v) => {
                        out.put_i32(v.len() as i32);
                        out.put_slice(v);
                    }
                    None => out.put_i32(-1),
                }
            }
        }
        Format::Text { .. } => {
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'\t');
                }
                match value {
                    None => out.put_slice(b"\\N"),
                    Some(v) => text_value(v, out),
                }
            }
            out.put_u8(b'\n');
        }
        Format::Csv { .. } => {
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                if let Some(v) = value {
                    csv_value(v, values.len() == 1, out);
                }
            }
            out.put_u8(b'\n');
        }
    });
}

/// The end of the data (binary: the trailer).
pub(super) fn epilogue(format: Format, out: &mut BytesMut) {
    if format == Format::Binary {
        copy_data(out, |out| out.put_i16(-1));
    }
}

fn copy_data(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u8(b'd');
    out.put_i32(0);
    body(out);
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// As PostgreSQL's `CopyAttributeOutText` with the tab delimiter.
fn text_value(value: &[u8], out: &mut BytesMut) {
    for &b in value {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            b'\t' => out.put_slice(b"\\t"),
            0x08 => out.put_slice(b"\\b"),
            0x0C => out.put_slice(b"\\f"),
            0x0B => out.put_slice(b"\\v"),
            _ => out.put_u8(b),
        }
    }
}

/// As PostgreSQL's `CopyAttributeOutCSV` with the default delimiter, quote,
/// escape and null string.
fn csv_value(value: &[u8], single: bool, out: &mut BytesMut) {
    let quote = value.is_empty()
        || (single && value == b"\\.")
        || value.iter().any(|&b| matches!(b, b',' | b'"' | b'\n' | b'\r'));
    if !quote {
        out.put_slice(value);
        return;
    }
    out.put_u8(b'"');
    for &b in value {
        if b == b'"' {
            out.put_u8(b'"');
        }
        out.put_u8(b);
    }
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_what_it_can_run_in_chunks() {
        let c = parse(b"COPY (SELECT ';', $$)$$ FROM t) TO STDOUT").unwrap();
        let blanked = format!("{}SELECT ';', $$)$$ FROM t{}", " ".repeat(6), " ".repeat(11));
        assert_eq!(c.source, Source::Query(blanked.into_bytes()));
        assert_eq!(c.format, Format::Text { header: false });
        let c = parse(b"copy public.\"T\" (a, \"B\") to stdout;").unwrap();
        assert_eq!(
            c.source,
            Source::Table { name: "public.\"T\"".into(), columns: Some(vec!["a".into(), "B".into()]) }
        );
        assert_eq!(parse(b"COPY t TO STDOUT WITH CSV HEADER").unwrap().format, Format::Csv { header: true });
        assert_eq!(parse(b"COPY t TO STDOUT (FORMAT binary)").unwrap().format, Format::Binary);
        assert_eq!(parse(b"COPY t TO STDOUT (format csv, header)").unwrap().format, Format::Csv { header: true });
        for sql in [
            &b"COPY t TO STDOUT (DELIMITER '|')"[..],
            b"COPY t FROM STDIN",
            b"COPY t TO '/tmp/x'",
            b"COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT",
            b"COPY (SELECT E'\\'') TO STDOUT",
            b"SELECT 1",
        ] {
            assert!(parse(sql).is_none(), "{}", String::from_utf8_lossy(sql));
        }
    }

    #[test]
    fn table_queries_use_the_columns_copy_would() {
        let catalog = vec![("a".to_owned(), false), ("g".to_owned(), true), ("B".to_owned(), false)];
        assert_eq!(table_query("t", None, &catalog).unwrap(), "SELECT \"a\", \"B\" FROM ONLY t");
        assert!(table_query("t", Some(&["x".to_owned()]), &catalog).is_none());
        assert!(table_query("t", Some(&["g".to_owned()]), &catalog).is_none());
    }

    #[test]
    fn formats_rows_as_postgres_does() {
        let mut out = BytesMut::new();
        row(Format::Text { header: false }, &[Some(b"a\tb\\c\n"), None], &mut out);
        assert_eq!(&out[5..], b"a\\tb\\\\c\\n\t\\N\n");
        let mut out = BytesMut::new();
        row(Format::Csv { header: false }, &[Some(b"x,\"y\""), Some(b""), None, Some(b"plain")], &mut out);
        assert_eq!(&out[5..], b"\"x,\"\"y\"\"\",\"\",,plain\n");
    }
}
