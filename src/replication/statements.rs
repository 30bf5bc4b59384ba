//! How grouped changes become local statements: `unnest` over text arrays
//! (one per column, values in the remote's text format, cast with the local
//! column type), `COPY` for big groups (binary when [`super::copy_binary`]
//! can convert every value), `= ANY` deletes, and row-by-row
//! matching for REPLICA IDENTITY FULL tables. Plain functions, no I/O
//! except [`run_steps`].

use std::collections::HashSet;
use std::sync::Arc;

use crate::Transaction;
use crate::params::Param;

use super::ChangeOp;
use super::copy_binary;
use super::pgoutput::{Tuple, Value};
use super::source::quote_ident;

/// Types without an equality operator: matched on their text form (FULL
/// identity only).
pub(super) const NO_EQUALITY: &[&str] = &["json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"];

/// A local column.
#[derive(Debug, Clone)]
pub(super) struct LocalColumn {
    pub(super) name: String,
    /// As `format_type` prints it (the same on both sides).
    pub(super) type_name: String,
    /// The remote attribute number, when known (see `apply::columns`).
    pub(super) attnum: Option<i16>,
}

/// What the apply knows about a remote table.
#[derive(Debug, Clone)]
pub(super) struct RelationState {
    pub(super) schema: String,
    pub(super) name: String,
    pub(super) qualified: String,
    /// One per column of the Relation message, in its order.
    pub(super) columns: Vec<LocalColumn>,
    /// Positions of the replica identity columns.
    pub(super) key: Vec<usize>,
    pub(super) full_identity: bool,
    pub(super) column_names: Arc<[String]>,
    /// Enum columns: position, type name, remote type OID (their values
    /// are checked against the labels known locally).
    pub(super) enum_columns: Vec<(usize, String, u32)>,
    /// Inserts and updates may be grouped apart and applied inserts first:
    /// the table has a replica identity key (not FULL) and no unique or
    /// exclusion index locally other than one (the key's). See
    /// `apply::batch::beside`.
    pub(super) reorder: bool,
}

/// Kinds of grouped changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GroupKind {
    Insert,
    /// Which columns are set (unchanged TOAST columns are not).
    Update(Vec<bool>),
    Delete,
}

/// Consecutive changes of one table and kind, not yet turned into SQL.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) relation: u32,
    pub(super) kind: GroupKind,
    /// For updates and deletes: key values first (in key order), then for
    /// updates the set columns. For inserts: all columns.
    pub(super) rows: Vec<Vec<Value>>,
    pub(super) keys: HashSet<Vec<Value>>,
}

pub(super) fn value_size(v: &Value) -> usize {
    match v {
        Value::Text(b) | Value::Binary(b) => b.len() + 3,
        _ => 4,
    }
}

pub(super) fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Null | Value::Unchanged => None,
    }
}

/// Appends a value as an element of a text-array literal.
pub(super) fn push_element(out: &mut String, v: &Value) {
    match v {
        Value::Text(b) | Value::Binary(b) => {
            out.push('"');
            for ch in String::from_utf8_lossy(b).chars() {
                if ch == '"' || ch == '\\' {
                    out.push('\\');
                }
                out.push(ch);
            }
            out.push('"');
        }
        Value::Null | Value::Unchanged => out.push_str("NULL"),
    }
}

/// One `text[]` parameter per column of `rows` (column `j` of every row).
pub(super) fn column_arrays(rows: &[Vec<Value>], width: usize) -> Vec<Param> {
    (0..width)
        .map(|j| {
            let mut s = String::with_capacity(rows.len() * 8 + 2);
            s.push('{');
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                push_element(&mut s, &row[j]);
            }
            s.push('}');
            Param::Untyped(s)
        })
        .collect()
}

pub(super) fn unnest(width: usize, first_param: usize) -> String {
    let args: Vec<String> = (0..width).map(|j| format!("${}::text[]", first_param + j)).collect();
    let names: Vec<String> = (0..width).map(|j| format!("c{j}")).collect();
    format!("unnest({}) AS u({})", args.join(", "), names.join(", "))
}

/// Groups at least this large are bulk-loaded with `COPY` (inserts, and
/// updates of whole rows as delete + insert).
pub(super) const COPY_MIN_ROWS: usize = 500;

/// One step of applying a transaction locally.
#[derive(Debug)]
pub(super) enum Step {
    /// A statement.
    Sql(String, Vec<Param>),
    /// `COPY ... FROM '/dev/blob'` with this data (needs a lease).
    Copy { sql: String, data: Vec<u8> },
}

/// Runs steps in order inside `tx`; consecutive statements share a round trip.
pub(super) async fn run_steps(tx: &Transaction, steps: Vec<Step>) -> Result<(), crate::Error> {
    let mut batch = Vec::new();
    for step in steps {
        match step {
            Step::Sql(sql, params) => batch.push((sql, params)),
            Step::Copy { sql, data } => {
                if !batch.is_empty() {
                    tx.batch(&std::mem::take(&mut batch)).await?;
                }
                tx.copy_in(&sql, data).await?;
            }
        }
    }
    if !batch.is_empty() {
        tx.batch(&batch).await?;
    }
    Ok(())
}

/// Appends a value in COPY text format.
pub(super) fn push_copy_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Text(b) | Value::Binary(b) => {
            for &byte in b.iter() {
                match byte {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    other => out.push(other),
                }
            }
        }
        Value::Null | Value::Unchanged => out.extend_from_slice(b"\\N"),
    }
}

/// Rows as COPY text data.
pub(super) fn copy_data(rows: &[&[Value]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 64);
    for row in rows {
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(b'\t');
            }
            push_copy_value(&mut out, v);
        }
        out.push(b'\n');
    }
    out
}

/// The steps for a group: big groups of inserts, and of updates of whole
/// rows (no unchanged TOAST value), are bulk-loaded with COPY (an update
/// becomes delete + insert: the same result for a cache table, which has no
/// triggers or foreign keys firing during the apply, at COPY speed).
pub(super) fn group_steps(rel: &RelationState, group: &Group) -> Vec<Step> {
    let nkey = rel.key.len();
    let big = group.rows.len() >= COPY_MIN_ROWS;
    let copy = |rows: &[&[Value]]| {
        let names: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!("COPY {} ({}) FROM '/dev/blob'", rel.qualified, names.join(", "));
        // Binary when every column and value allows it: the engine loads
        // it up to twice as fast (see `copy_binary`).
        let kinds = copy_binary::Kind::of_all(rel.columns.iter().map(|c| c.type_name.as_str()));
        match kinds.and_then(|kinds| copy_binary::copy_data(rows, &kinds)) {
            Some(data) => Step::Copy { sql: format!("{sql} WITH (FORMAT binary)"), data },
            None => Step::Copy { sql, data: copy_data(rows) },
        }
    };
    match &group.kind {
        GroupKind::Insert if big => {
            let rows: Vec<&[Value]> = group.rows.iter().map(Vec::as_slice).collect();
            vec![copy(&rows)]
        }
        GroupKind::Update(mask) if big && nkey > 0 && mask.iter().all(|&m| m) => {
            let keys = Group {
                relation: group.relation,
                kind: GroupKind::Delete,
                rows: group.rows.iter().map(|r| r[..nkey].to_vec()).collect(),
                keys: HashSet::new(),
            };
            let (sql, params) = group_statement(rel, &keys);
            let rows: Vec<&[Value]> = group.rows.iter().map(|r| &r[nkey..]).collect();
            vec![Step::Sql(sql, params), copy(&rows)]
        }
        _ => {
            let (sql, params) = group_statement(rel, group);
            vec![Step::Sql(sql, params)]
        }
    }
}

/// One row's values as parameters (text format; NULL as NULL).
fn row_params(row: &[Value]) -> Vec<Param> {
    row.iter().map(|v| value_text(v).map_or(Param::Null, Param::Untyped)).collect()
}

/// The statement for a group of exactly one row: plain `VALUES` and
/// `WHERE key = $n`, which cost the engine less than `unnest` over arrays
/// (measured with prepared generic plans: 65 vs 85 µs of CPU for a
/// one-INSERT-one-UPDATE transaction, `examples/replication_bench_engine.rs`).
fn one_row_statement(rel: &RelationState, kind: &GroupKind, row: &[Value]) -> (String, Vec<Param>) {
    let cols = &rel.columns;
    let key_conds = |first: usize| -> Vec<String> {
        rel.key
            .iter()
            .enumerate()
            .map(|(k, &i)| format!("{} = ${}::{}", quote_ident(&cols[i].name), first + k, cols[i].type_name))
            .collect()
    };
    match kind {
        GroupKind::Insert => {
            let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            let values: Vec<String> =
                cols.iter().enumerate().map(|(j, c)| format!("${}::{}", j + 1, c.type_name)).collect();
            let sql = format!("INSERT INTO {} ({}) VALUES ({})", rel.qualified, names.join(", "), values.join(", "));
            (sql, row_params(row))
        }
        GroupKind::Update(mask) => {
            let nkey = rel.key.len();
            let sets: Vec<String> = mask
                .iter()
                .enumerate()
                .filter(|(_, m)| **m)
                .enumerate()
                .map(|(k, (i, _))| format!("{} = ${}::{}", quote_ident(&cols[i].name), nkey + k + 1, cols[i].type_name))
                .collect();
            let sql = format!("UPDATE {} SET {} WHERE {}", rel.qualified, sets.join(", "), key_conds(1).join(" AND "));
            (sql, row_params(row))
        }
        GroupKind::Delete => {
            let sql = format!("DELETE FROM {} WHERE {}", rel.qualified, key_conds(1).join(" AND "));
            (sql, row_params(row))
        }
    }
}

/// The statement for a group of inserts, updates or deletes.
pub(super) fn group_statement(rel: &RelationState, group: &Group) -> (String, Vec<Param>) {
    let cols = &rel.columns;
    if let [row] = group.rows.as_slice() {
        return one_row_statement(rel, &group.kind, row);
    }
    match &group.kind {
        GroupKind::Insert => {
            let names: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
            let casts: Vec<String> = cols.iter().enumerate().map(|(j, c)| format!("u.c{j}::{}", c.type_name)).collect();
            let sql = format!(
                "INSERT INTO {} ({}) SELECT {} FROM {}",
                rel.qualified,
                names.join(", "),
                casts.join(", "),
                unnest(cols.len(), 1)
            );
            (sql, column_arrays(&group.rows, cols.len()))
        }
        GroupKind::Update(mask) => {
            let nkey = rel.key.len();
            let set_cols: Vec<usize> = mask.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i).collect();
            let width = nkey + set_cols.len();
            let sets: Vec<String> = set_cols
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("{} = u.c{}::{}", quote_ident(&cols[i].name), nkey + k, cols[i].type_name))
                .collect();
            let conds: Vec<String> = rel
                .key
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("t.{} = u.c{k}::{}", quote_ident(&cols[i].name), cols[i].type_name))
                .collect();
            let sql = format!(
                "UPDATE {} AS t SET {} FROM {} WHERE {}",
                rel.qualified,
                sets.join(", "),
                unnest(width, 1),
                conds.join(" AND ")
            );
            (sql, column_arrays(&group.rows, width))
        }
        GroupKind::Delete if rel.key.len() == 1 && !cols[rel.key[0]].type_name.ends_with("[]") => {
            // One key column: an index scan over an array of keys.
            let key = &cols[rel.key[0]];
            let sql = format!(
                "DELETE FROM {} WHERE {} = ANY($1::{}[])",
                rel.qualified,
                quote_ident(&key.name),
                key.type_name
            );
            (sql, column_arrays(&group.rows, 1))
        }
        GroupKind::Delete => {
            let nkey = rel.key.len();
            let conds: Vec<String> = rel
                .key
                .iter()
                .enumerate()
                .map(|(k, &i)| format!("t.{} = u.c{k}::{}", quote_ident(&cols[i].name), cols[i].type_name))
                .collect();
            let sql =
                format!("DELETE FROM {} AS t USING {} WHERE {}", rel.qualified, unnest(nkey, 1), conds.join(" AND "));
            (sql, column_arrays(&group.rows, nkey))
        }
    }
}

/// UPDATE or DELETE of exactly one row matching all of `old` (REPLICA
/// IDENTITY FULL: there may be no key, and duplicates are possible).
pub(super) fn full_identity_statement(
    rel: &RelationState,
    op: ChangeOp,
    old: &Tuple,
    new: Option<&Tuple>,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut conds = Vec::new();
    for (j, c) in rel.columns.iter().enumerate() {
        let name = quote_ident(&c.name);
        match &old[j] {
            Value::Unchanged => continue,
            Value::Null => conds.push(format!("{name} IS NULL")),
            v => {
                params.push(Param::Untyped(value_text(v).unwrap_or_default()));
                let base = c.type_name.trim_end_matches("[]");
                if NO_EQUALITY.contains(&base) {
                    conds.push(format!("{name}::text = ${}::text", params.len()));
                } else {
                    conds.push(format!("{name} = ${}::{}", params.len(), c.type_name));
                }
            }
        }
    }
    let locate = format!(
        "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
        rel.qualified,
        if conds.is_empty() { "true".into() } else { conds.join(" AND ") }
    );
    match (op, new) {
        (ChangeOp::Update, Some(new)) => {
            let mut sets = Vec::new();
            for (j, c) in rel.columns.iter().enumerate() {
                match &new[j] {
                    Value::Unchanged => {}
                    v => {
                        params.push(value_text(v).map_or(Param::Null, Param::Untyped));
                        sets.push(format!("{} = ${}::{}", quote_ident(&c.name), params.len(), c.type_name));
                    }
                }
            }
            (format!("UPDATE {} SET {} WHERE {locate}", rel.qualified, sets.join(", ")), params)
        }
        _ => (format!("DELETE FROM {} WHERE {locate}", rel.qualified), params),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn array_literals_quote_everything() {
        let rows = vec![vec![text(r#"a"b\c"#)], vec![Value::Null], vec![text("{x,y}")], vec![text("NULL")]];
        let params = column_arrays(&rows, 1);
        assert_eq!(params[0], Param::Untyped(r#"{"a\"b\\c",NULL,"{x,y}","NULL"}"#.into()));
    }

    fn rel() -> RelationState {
        RelationState {
            schema: "public".into(),
            name: "t".into(),
            qualified: "\"public\".\"t\"".into(),
            columns: vec![
                LocalColumn { name: "id".into(), type_name: "integer".into(), attnum: None },
                LocalColumn { name: "v".into(), type_name: "text".into(), attnum: None },
            ],
            key: vec![0],
            full_identity: false,
            column_names: Arc::from(vec!["id".to_string(), "v".to_string()]),
            enum_columns: vec![],
            reorder: true,
        }
    }

    #[test]
    fn one_row_groups_use_plain_statements() {
        let r = rel();
        let g = Group {
            relation: 1,
            kind: GroupKind::Insert,
            rows: vec![vec![text("1"), Value::Null]],
            keys: HashSet::new(),
        };
        let (sql, params) = group_statement(&r, &g);
        assert_eq!(sql, r#"INSERT INTO "public"."t" ("id", "v") VALUES ($1::integer, $2::text)"#);
        assert_eq!(params, vec![Param::Untyped("1".into()), Param::Null]);
        let g = Group {
            relation: 1,
            kind: GroupKind::Update(vec![false, true]),
            rows: vec![vec![text("1"), text("y")]],
            keys: HashSet::new(),
        };
        let (sql, params) = group_statement(&r, &g);
        assert_eq!(sql, r#"UPDATE "public"."t" SET "v" = $2::text WHERE "id" = $1::integer"#);
        assert_eq!(params.len(), 2);
        let mut r2 = rel();
        r2.key = vec![0, 1];
        let g = Group {
            relation: 1,
            kind: GroupKind::Delete,
            rows: vec![vec![text("1"), text("a")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r2, &g);
        assert_eq!(sql, r#"DELETE FROM "public"."t" WHERE "id" = $1::integer AND "v" = $2::text"#);
    }

    #[test]
    fn big_groups_are_copied_in_binary_when_every_value_allows() {
        let copy_sql = |steps: Vec<Step>| match steps.into_iter().last() {
            Some(Step::Copy { sql, .. }) => sql,
            other => panic!("expected a COPY, got {other:?}"),
        };
        let rows = |odd: &str| -> Vec<Vec<Value>> {
            (0..COPY_MIN_ROWS).map(|i| vec![text(if i == 7 { odd } else { "1" }), text("x")]).collect()
        };
        let group = |rows| Group { relation: 1, kind: GroupKind::Insert, rows, keys: HashSet::new() };
        let sql = copy_sql(group_steps(&rel(), &group(rows("7"))));
        assert!(sql.ends_with("FROM '/dev/blob' WITH (FORMAT binary)"), "{sql}");
        // A value the conversion does not read: the whole step in text.
        let sql = copy_sql(group_steps(&rel(), &group(rows("1e3"))));
        assert!(sql.ends_with("FROM '/dev/blob'"), "{sql}");
        // A column type it does not cover: text.
        let mut interval = rel();
        interval.columns[0].type_name = "interval".into();
        let sql = copy_sql(group_steps(&interval, &group(rows("7"))));
        assert!(sql.ends_with("FROM '/dev/blob'"), "{sql}");
    }

    #[test]
    fn group_statements() {
        let r = rel();
        let g = Group {
            relation: 1,
            kind: GroupKind::Insert,
            rows: vec![vec![text("1"), text("x")], vec![text("2"), text("x")]],
            keys: HashSet::new(),
        };
        let (sql, params) = group_statement(&r, &g);
        assert_eq!(
            sql,
            r#"INSERT INTO "public"."t" ("id", "v") SELECT u.c0::integer, u.c1::text FROM unnest($1::text[], $2::text[]) AS u(c0, c1)"#
        );
        assert_eq!(params.len(), 2);
        let g = Group {
            relation: 1,
            kind: GroupKind::Update(vec![false, true]),
            rows: vec![vec![text("1"), text("y")], vec![text("2"), text("y")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r, &g);
        assert_eq!(
            sql,
            r#"UPDATE "public"."t" AS t SET "v" = u.c1::text FROM unnest($1::text[], $2::text[]) AS u(c0, c1) WHERE t."id" = u.c0::integer"#
        );
        let g = Group {
            relation: 1,
            kind: GroupKind::Delete,
            rows: vec![vec![text("1")], vec![text("2")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r, &g);
        assert_eq!(sql, r#"DELETE FROM "public"."t" WHERE "id" = ANY($1::integer[])"#);
        // Composite keys join on unnest.
        let mut r2 = rel();
        r2.key = vec![0, 1];
        let g = Group {
            relation: 1,
            kind: GroupKind::Delete,
            rows: vec![vec![text("1"), text("a")], vec![text("2"), text("b")]],
            keys: HashSet::new(),
        };
        let (sql, _) = group_statement(&r2, &g);
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."t" AS t USING unnest($1::text[], $2::text[]) AS u(c0, c1) WHERE t."id" = u.c0::integer AND t."v" = u.c1::text"#
        );
    }

    #[test]
    fn copy_text_escapes_and_big_groups_use_copy() {
        let data = copy_data(&[&[text("a\tb\\c\nd\re"), Value::Null], &[text("x"), text("")]]);
        assert_eq!(data, b"a\\tb\\\\c\\nd\\re\t\\N\nx\t\n".to_vec());
        let r = rel();
        let rows: Vec<Vec<Value>> = (0..COPY_MIN_ROWS).map(|i| vec![text(&i.to_string()), text("v")]).collect();
        let g = Group { relation: 1, kind: GroupKind::Insert, rows: rows.clone(), keys: HashSet::new() };
        assert!(matches!(group_steps(&r, &g)[..], [Step::Copy { .. }]));
        // Whole-row updates: delete the keys, copy the rows.
        let upd: Vec<Vec<Value>> = rows.iter().map(|row| [vec![row[0].clone()], row.clone()].concat()).collect();
        let g =
            Group { relation: 1, kind: GroupKind::Update(vec![true, true]), rows: upd.clone(), keys: HashSet::new() };
        assert!(matches!(group_steps(&r, &g)[..], [Step::Sql(..), Step::Copy { .. }]));
        // An unchanged TOAST column keeps the UPDATE.
        let g = Group { relation: 1, kind: GroupKind::Update(vec![true, false]), rows: upd, keys: HashSet::new() };
        assert!(matches!(group_steps(&r, &g)[..], [Step::Sql(..)]));
    }

    #[test]
    fn full_identity_matches_one_row() {
        let mut r = rel();
        r.key = vec![0, 1];
        r.full_identity = true;
        let (sql, params) = full_identity_statement(&r, ChangeOp::Delete, &vec![text("1"), Value::Null], None);
        assert_eq!(
            sql,
            r#"DELETE FROM "public"."t" WHERE ctid = (SELECT ctid FROM "public"."t" WHERE "id" = $1::integer AND "v" IS NULL LIMIT 1)"#
        );
        assert_eq!(params.len(), 1);
    }
}
