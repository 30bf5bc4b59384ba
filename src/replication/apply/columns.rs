//! Following a table's shape upstream, purely: the apply's own view of a
//! table's columns against a new Relation message gives the column changes
//! to make locally, or the reason they cannot be told apart (then the table
//! is copied again).
//!
//! What a Relation message says: the published columns in attribute order,
//! with name, type and typmod, but not their attribute numbers. Columns
//! only move in known ways: `ADD COLUMN` appends, `DROP COLUMN` removes one
//! in place, `RENAME` and `ALTER ... TYPE` keep the position. So two
//! descriptions line up; what is ambiguous is a column that disappears at
//! the position where another appears (a rename, or a drop then an add).
//! The remote catalog's attribute numbers settle it when they are known
//! (the catalog was read when it still described the message's columns);
//! otherwise positions decide in the middle of the table, and at its end,
//! where an added column lands, the answer is "copy the table again".

use crate::replication::source::{quote_ident, quote_literal};

use super::super::statements::LocalColumn;

/// A column of a new Relation message, with what the catalog adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewColumn {
    /// Name.
    pub name: String,
    /// The type as the remote's `format_type` prints it.
    pub type_name: String,
    /// The remote attribute number, when the catalog matched the message.
    pub attnum: Option<i16>,
}

/// One change to a local table's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ColumnChange {
    /// `DROP COLUMN`.
    Drop { name: String },
    /// `RENAME COLUMN`.
    Rename { from: String, to: String },
    /// `ALTER COLUMN ... TYPE` (named by its new name).
    Retype { name: String, from_type: String, type_name: String },
    /// `ADD COLUMN`; `fill` is what existing rows read (the remote's
    /// "missing value" of a non-volatile default), `None` for NULL.
    Add { name: String, type_name: String, fill: Option<String> },
}

/// The changes that turn `old` into `new`, in the order to apply them
/// (drops, renames, type changes, adds), or why they are ambiguous.
#[cfg(test)]
pub(crate) fn diff(old: &[LocalColumn], new: &[NewColumn]) -> Result<Vec<ColumnChange>, String> {
    plan(old, new).map(|(changes, _)| changes)
}

/// [`diff`], and the view after the changes: the new message's columns,
/// each keeping the attribute number known for it before when the catalog
/// did not give one now.
pub(crate) fn plan(old: &[LocalColumn], new: &[NewColumn]) -> Result<(Vec<ColumnChange>, Vec<LocalColumn>), String> {
    let mut matched: Vec<Option<usize>> = vec![None; new.len()];
    let mut taken = vec![false; old.len()];
    // Same attribute number: the same column, whatever its name now.
    for (j, n) in new.iter().enumerate() {
        if let Some(k) = n.attnum
            && let Some(i) = old.iter().position(|o| o.attnum == Some(k))
            && !taken[i]
        {
            matched[j] = Some(i);
            taken[i] = true;
        }
    }
    // Same name, unless both numbers are known and differ (dropped, then
    // added again under the same name).
    for (j, n) in new.iter().enumerate() {
        if matched[j].is_some() {
            continue;
        }
        if let Some(i) = old.iter().position(|o| o.name == n.name)
            && !taken[i]
            && !(o_attnum(old, i).is_some() && n.attnum.is_some())
        {
            matched[j] = Some(i);
            taken[i] = true;
        }
    }
    let anchors: Vec<(usize, usize)> = matched.iter().enumerate().filter_map(|(j, m)| m.map(|i| (i, j))).collect();
    if anchors.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err("columns changed order".into());
    }
    // Regions between consecutive anchors: columns gone from `old` and
    // columns new in `new`.
    let mut pairs: Vec<(usize, usize)> = anchors.clone();
    let mut drops = Vec::new();
    let mut adds = Vec::new();
    let mut bounds: Vec<(usize, usize)> = vec![(0, 0)];
    bounds.extend(anchors.iter().map(|&(i, j)| (i + 1, j + 1)));
    for (r, &(oi, nj)) in bounds.iter().enumerate() {
        let (oe, ne, tail) = match anchors.get(r) {
            Some(&(i, j)) => (i, j, false),
            None => (old.len(), new.len(), true),
        };
        let gone: Vec<usize> = (oi..oe).filter(|&i| !taken[i]).collect();
        let added: Vec<usize> = (nj..ne).filter(|&j| matched[j].is_none()).collect();
        let known = gone.iter().all(|&i| old[i].attnum.is_some()) && added.iter().all(|&j| new[j].attnum.is_some());
        if gone.is_empty() || added.is_empty() || known {
            if !tail && !added.is_empty() {
                return Err(format!("column {} appeared between existing columns", new[added[0]].name));
            }
            drops.extend(gone);
            adds.extend(added);
        } else if !tail && gone.len() == added.len() {
            // In place of columns that disappeared: renamed.
            pairs.extend(gone.into_iter().zip(added));
        } else {
            return Err(format!(
                "column {} replaced {} upstream: renamed, or dropped and added",
                new[added[0]].name, old[gone[0]].name
            ));
        }
    }
    pairs.sort_by_key(|&(_, j)| j);
    let mut changes: Vec<ColumnChange> =
        drops.iter().map(|&i| ColumnChange::Drop { name: old[i].name.clone() }).collect();
    for &(i, j) in &pairs {
        if old[i].name != new[j].name {
            changes.push(ColumnChange::Rename { from: old[i].name.clone(), to: new[j].name.clone() });
        }
    }
    for &(i, j) in &pairs {
        if old[i].type_name != new[j].type_name {
            changes.push(ColumnChange::Retype {
                name: new[j].name.clone(),
                from_type: old[i].type_name.clone(),
                type_name: new[j].type_name.clone(),
            });
        }
    }
    for &j in &adds {
        changes.push(ColumnChange::Add { name: new[j].name.clone(), type_name: new[j].type_name.clone(), fill: None });
    }
    let mut view = view_after(new);
    for &(i, j) in &pairs {
        view[j].attnum = new[j].attnum.or(old[i].attnum);
    }
    Ok((changes, view))
}

fn o_attnum(old: &[LocalColumn], i: usize) -> Option<i16> {
    old[i].attnum
}

/// The local DDL for `changes` of table `qualified`. Renames whose target
/// name is still in use (swaps, chains) go through temporary names.
pub(crate) fn ddl(qualified: &str, old: &[LocalColumn], changes: &[ColumnChange]) -> Vec<String> {
    let alter = |what: String| format!("ALTER TABLE {qualified} {what}");
    let mut out = Vec::new();
    let mut names: Vec<String> = old.iter().map(|c| c.name.clone()).collect();
    for c in changes {
        if let ColumnChange::Drop { name } = c {
            out.push(alter(format!("DROP COLUMN {}", quote_ident(name))));
            names.retain(|n| n != name);
        }
    }
    let renames: Vec<(&String, &String)> = changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Rename { from, to } => Some((from, to)),
            _ => None,
        })
        .collect();
    let clash = renames.iter().any(|(_, to)| names.contains(to));
    if clash {
        for (k, (from, _)) in renames.iter().enumerate() {
            out.push(alter(format!("RENAME COLUMN {} TO {}", quote_ident(from), quote_ident(&temp_name(k)))));
        }
    }
    for (k, (from, to)) in renames.iter().enumerate() {
        let from = if clash { temp_name(k) } else { (*from).clone() };
        out.push(alter(format!("RENAME COLUMN {} TO {}", quote_ident(&from), quote_ident(to))));
    }
    for c in changes {
        match c {
            ColumnChange::Retype { name, type_name, .. } => {
                out.push(alter(format!("ALTER COLUMN {} TYPE {type_name}", quote_ident(name))))
            }
            ColumnChange::Add { name, type_name, fill: Some(value) } => {
                // Existing rows get the remote's missing value, later rows
                // carry their own.
                let column = quote_ident(name);
                out.push(alter(format!(
                    "ADD COLUMN {column} {type_name} DEFAULT {}::{type_name}",
                    quote_literal(value)
                )));
                out.push(alter(format!("ALTER COLUMN {column} DROP DEFAULT")));
            }
            ColumnChange::Add { name, type_name, fill: None } => {
                out.push(alter(format!("ADD COLUMN {} {type_name}", quote_ident(name))))
            }
            _ => {}
        }
    }
    out
}

/// `ALTER TYPE ... ADD VALUE` for the labels of `remote` missing from
/// `local`, each placed after its predecessor upstream (or before the
/// first label) so that the order is the remote's.
pub(crate) fn add_labels(type_name: &str, local: &[String], remote: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, label) in remote.iter().enumerate() {
        if local.contains(label) {
            continue;
        }
        let place = match i.checked_sub(1) {
            Some(p) => format!("AFTER {}", quote_literal(&remote[p])),
            None => format!("BEFORE {}", quote_literal(&local[0])),
        };
        out.push(format!("ALTER TYPE {type_name} ADD VALUE IF NOT EXISTS {} {place}", quote_literal(label)));
    }
    out
}

fn temp_name(k: usize) -> String {
    format!("pglite_cache_renaming_{k}")
}

/// The new message's columns as a view (attribute numbers as given).
pub(crate) fn view_after(new: &[NewColumn]) -> Vec<LocalColumn> {
    new.iter().map(|n| LocalColumn { name: n.name.clone(), type_name: n.type_name.clone(), attnum: n.attnum }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old(cols: &[(&str, &str, Option<i16>)]) -> Vec<LocalColumn> {
        cols.iter().map(|&(n, t, a)| LocalColumn { name: n.into(), type_name: t.into(), attnum: a }).collect()
    }
    fn new(cols: &[(&str, &str, Option<i16>)]) -> Vec<NewColumn> {
        cols.iter().map(|&(n, t, a)| NewColumn { name: n.into(), type_name: t.into(), attnum: a }).collect()
    }
    fn drop(n: &str) -> ColumnChange {
        ColumnChange::Drop { name: n.into() }
    }
    fn rename(a: &str, b: &str) -> ColumnChange {
        ColumnChange::Rename { from: a.into(), to: b.into() }
    }
    fn add(n: &str, t: &str) -> ColumnChange {
        ColumnChange::Add { name: n.into(), type_name: t.into(), fill: None }
    }

    #[test]
    fn adds_drops_renames_and_type_changes_by_name_and_position() {
        let o = old(&[("id", "integer", None), ("v", "text", None), ("w", "integer", None)]);
        // Two columns added (one remote transaction, or two merged).
        let n = new(&[
            ("id", "integer", None),
            ("v", "text", None),
            ("w", "integer", None),
            ("a", "text", None),
            ("b", "date", None),
        ]);
        assert_eq!(diff(&o, &n).unwrap(), vec![add("a", "text"), add("b", "date")]);
        // A column dropped in the middle.
        let n = new(&[("id", "integer", None), ("w", "integer", None)]);
        assert_eq!(diff(&o, &n).unwrap(), vec![drop("v")]);
        // Renamed in the middle: the position says so.
        let n = new(&[("id", "integer", None), ("v2", "text", None), ("w", "integer", None)]);
        assert_eq!(diff(&o, &n).unwrap(), vec![rename("v", "v2")]);
        // Retyped.
        let n = new(&[("id", "bigint", None), ("v", "text", None), ("w", "integer", None)]);
        assert_eq!(
            diff(&o, &n).unwrap(),
            vec![ColumnChange::Retype { name: "id".into(), from_type: "integer".into(), type_name: "bigint".into() }]
        );
        // The last column replaced: rename or drop + add? Unknowable without attnums.
        let n = new(&[("id", "integer", None), ("v", "text", None), ("x", "integer", None)]);
        assert!(diff(&o, &n).is_err());
        // An added column cannot appear before an existing one.
        let n = new(&[("id", "integer", None), ("new", "text", None), ("v", "text", None), ("w", "integer", None)]);
        assert!(diff(&o, &n).is_err());
    }

    #[test]
    fn attribute_numbers_settle_renames_and_re_adds() {
        let o = old(&[("id", "integer", Some(1)), ("v", "text", Some(2)), ("w", "integer", Some(3))]);
        let n = new(&[("id", "integer", Some(1)), ("v", "text", Some(2)), ("x", "integer", Some(3))]);
        assert_eq!(diff(&o, &n).unwrap(), vec![rename("w", "x")]);
        let n = new(&[("id", "integer", Some(1)), ("v", "text", Some(2)), ("x", "integer", Some(4))]);
        assert_eq!(diff(&o, &n).unwrap(), vec![drop("w"), add("x", "integer")]);
        // Dropped and added again under the same name: its values are gone.
        let n = new(&[("id", "integer", Some(1)), ("v", "text", Some(2)), ("w", "integer", Some(4))]);
        assert_eq!(diff(&o, &n).unwrap(), vec![drop("w"), add("w", "integer")]);
        // Swapped names.
        let n = new(&[("id", "integer", Some(1)), ("w", "text", Some(2)), ("v", "integer", Some(3))]);
        let changes = diff(&o, &n).unwrap();
        assert_eq!(changes, vec![rename("v", "w"), rename("w", "v")]);
        let sql = ddl("t", &o, &changes);
        assert_eq!(
            sql,
            vec![
                r#"ALTER TABLE t RENAME COLUMN "v" TO "pglite_cache_renaming_0""#,
                r#"ALTER TABLE t RENAME COLUMN "w" TO "pglite_cache_renaming_1""#,
                r#"ALTER TABLE t RENAME COLUMN "pglite_cache_renaming_0" TO "w""#,
                r#"ALTER TABLE t RENAME COLUMN "pglite_cache_renaming_1" TO "v""#,
            ]
        );
    }

    #[test]
    fn enum_labels_keep_the_remote_order() {
        let local = vec!["sad".to_string(), "happy".to_string()];
        let remote: Vec<String> = ["meh", "sad", "ok", "happy", "ecstatic"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            add_labels("mood", &local, &remote),
            vec![
                "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'meh' BEFORE 'sad'",
                "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'ok' AFTER 'sad'",
                "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'ecstatic' AFTER 'happy'",
            ]
        );
    }

    #[test]
    fn attribute_numbers_carry_over_when_the_catalog_says_nothing() {
        let o = old(&[("id", "integer", Some(1)), ("v", "text", Some(2)), ("z", "text", Some(3))]);
        let n = new(&[("id", "integer", None), ("w", "text", None), ("z", "text", None), ("x", "date", None)]);
        let (changes, view) = plan(&o, &n).unwrap();
        assert_eq!(changes, vec![rename("v", "w"), add("x", "date")]);
        assert_eq!(view.iter().map(|c| c.attnum).collect::<Vec<_>>(), vec![Some(1), Some(2), Some(3), None]);
    }

    #[test]
    fn ddl_for_each_change() {
        let o = old(&[("id", "integer", None), ("v", "text", None)]);
        let changes = vec![
            drop("v"),
            ColumnChange::Retype { name: "id".into(), from_type: "integer".into(), type_name: "bigint".into() },
            ColumnChange::Add { name: "d".into(), type_name: "text".into(), fill: Some("it's".into()) },
        ];
        assert_eq!(
            ddl(r#""public"."t""#, &o, &changes),
            vec![
                r#"ALTER TABLE "public"."t" DROP COLUMN "v""#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "id" TYPE bigint"#,
                r#"ALTER TABLE "public"."t" ADD COLUMN "d" text DEFAULT 'it''s'::text"#,
                r#"ALTER TABLE "public"."t" ALTER COLUMN "d" DROP DEFAULT"#,
            ]
        );
    }
}
