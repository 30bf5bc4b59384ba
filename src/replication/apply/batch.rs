//! The pure part of the apply: the changes of the local transaction being
//! built, grouped per table, turned into statements ([`Step`]s). No I/O:
//! the caller feeds decoded changes and the table descriptions it holds
//! (its own view of each table's columns), and runs the steps it takes out.
//!
//! Changes of different tables commute (cache tables have no foreign keys,
//! and no triggers of ours act during the apply), so each table keeps its own open
//! group; a table's group ends when the kind of change changes (except that
//! inserts and updates of a table whose only unique index is its key keep
//! one group each, see [`beside`]), a key repeats in an update group, the
//! key itself changes, or a statement of its own (DDL, TRUNCATE, a FULL
//! identity row) must run in order.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use std::sync::Arc;

use crate::params::Param;

use super::super::ChangeOp;
use super::super::error::ReplicationError;
use super::super::pgoutput::{OldTuple, Tuple, Value};
use super::super::statements::{
    Group, GroupKind, RelationState, Step, full_identity_statement, group_steps, value_size,
};

/// The statements of the local transaction being built.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Open groups, at most one per table.
    groups: Vec<(Arc<RelationState>, Group)>,
    /// Steps ready to run, in order.
    steps: Vec<Step>,
    /// Approximate size of what is held (groups and steps), in bytes.
    pub(crate) buffered: usize,
    /// Row changes added since the batch began.
    pub(crate) changes: usize,
    /// Unchanged TOAST values of UPDATEs, kept from the local rows.
    pub(crate) unchanged_toast: u64,
    /// Groups opened beside another group of their table (a statistic).
    pub(crate) reordered: u64,
    /// Tables with DDL among the steps not yet taken: the local catalog
    /// does not show it yet (e.g. a rename), so it must not be asked about
    /// them by their new description.
    ddl_tables: HashSet<u32>,
}

impl Batch {
    /// Steps ready to run (statements of closed groups).
    pub(crate) fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// Adds one row change of `rel` (remote OID `relation`).
    pub(crate) fn change(
        &mut self,
        relation: u32,
        rel: &Arc<RelationState>,
        op: ChangeOp,
        old: Option<OldTuple>,
        new: Option<Tuple>,
    ) -> Result<(), ReplicationError> {
        self.changes += 1;
        if rel.full_identity && op != ChangeOp::Insert {
            let old = old
                .ok_or_else(|| ReplicationError::fatal("UPDATE/DELETE of a FULL identity table without the old row"))?;
            let (sql, params) = full_identity_statement(rel, op, old.values(), new.as_ref());
            self.statement_for(relation, sql, params);
            return Ok(());
        }
        // An update that changes the key is applied on its own: inside a
        // group, a later change of the new key would not see it.
        let isolate = op == ChangeOp::Update && old.is_some();
        let (kind, row) = match op {
            ChangeOp::Insert => {
                let new = new.ok_or_else(|| ReplicationError::fatal("INSERT without a row"))?;
                (GroupKind::Insert, new)
            }
            ChangeOp::Update => {
                let new = new.ok_or_else(|| ReplicationError::fatal("UPDATE without a new row"))?;
                let key_source = match &old {
                    Some(old) => old.values(),
                    None => &new,
                };
                let mut row: Vec<Value> = rel.key.iter().map(|&i| key_source[i].clone()).collect();
                let mask: Vec<bool> = new.iter().map(|v| !matches!(v, Value::Unchanged)).collect();
                self.unchanged_toast += mask.iter().filter(|&&m| !m).count() as u64;
                if !mask.iter().any(|&m| m) {
                    return Ok(());
                }
                row.extend(new.into_iter().filter(|v| !matches!(v, Value::Unchanged)));
                (GroupKind::Update(mask), row)
            }
            ChangeOp::Delete => {
                let old = old.ok_or_else(|| ReplicationError::fatal("DELETE without a key"))?;
                let row: Vec<Value> = rel.key.iter().map(|&i| old.values()[i].clone()).collect();
                (GroupKind::Delete, row)
            }
            ChangeOp::Truncate => return Err(ReplicationError::fatal("TRUNCATE is not a row change")),
        };
        if rel.key.is_empty() && kind != GroupKind::Insert {
            return Err(ReplicationError::needs_operator(
                format!("{}: UPDATE/DELETE on a table without a replica identity", rel.qualified),
                "give the remote table a primary key or REPLICA IDENTITY FULL",
            ));
        }
        let width = rel.columns.len();
        let arity_ok = match &kind {
            GroupKind::Insert => row.len() == width,
            GroupKind::Update(mask) => mask.len() == width,
            GroupKind::Delete => true,
        };
        if !arity_ok {
            return Err(ReplicationError::fatal(format!(
                "{}: a row does not match its Relation message",
                rel.qualified
            )));
        }
        let size: usize = row.iter().map(value_size).sum::<usize>() + 8;
        let nkey = rel.key.len();
        // An insert of a key an open update group of the table touched
        // cannot run before that update: apply what is open, in order.
        // (Cannot happen without a delete in between, which ends the groups;
        // checked anyway, it is cheap.)
        if kind == GroupKind::Insert
            && self.groups.iter().any(|(_, g)| {
                g.relation == relation
                    && matches!(g.kind, GroupKind::Update(_))
                    && g.keys.contains(&rel.key.iter().map(|&i| row[i].clone()).collect::<Vec<_>>())
            })
        {
            self.flush_table(relation);
        }
        let open =
            self.groups.iter().position(|(r, g)| g.relation == relation && g.kind == kind && Arc::ptr_eq(r, rel));
        // The same key twice in one update group would be applied once.
        let repeated = |i: usize| matches!(kind, GroupKind::Update(_)) && self.groups[i].1.keys.contains(&row[..nkey]);
        let fits = !isolate && open.is_some_and(|i| !repeated(i));
        if !fits {
            // A group of the other kind (insert vs update) may open beside
            // the table's open group: see `beside`.
            let mine: Vec<usize> =
                self.groups.iter().enumerate().filter(|(_, (_, g))| g.relation == relation).map(|(i, _)| i).collect();
            let ok = !isolate
                && open.is_none()
                && match mine.as_slice() {
                    [] => true,
                    [other] => beside(rel, &kind, &self.groups[*other]),
                    _ => false,
                };
            if !ok {
                self.flush_table(relation);
            } else if !mine.is_empty() {
                self.reordered += 1;
            }
            let group = Group { relation, kind: kind.clone(), rows: Vec::new(), keys: HashSet::new() };
            self.groups.push((rel.clone(), group));
        }
        let (_, group) = self
            .groups
            .iter_mut()
            .find(|(_, g)| g.relation == relation && g.kind == kind)
            .expect("group was just ensured");
        if matches!(kind, GroupKind::Update(_)) {
            group.keys.insert(row[..nkey].to_vec());
        }
        group.rows.push(row);
        self.buffered += size;
        if isolate {
            self.flush_table(relation);
        }
        Ok(())
    }

    /// A statement that must run after everything of table `relation` so
    /// far (and before its later changes).
    pub(crate) fn statement_for(&mut self, relation: u32, sql: String, params: Vec<Param>) {
        self.flush_table(relation);
        self.push(sql, params);
    }

    /// DDL of table `relation`, run in order like [`Self::statement_for`].
    pub(crate) fn ddl_for(&mut self, relation: u32, sql: String, params: Vec<Param>) {
        self.ddl_tables.insert(relation);
        self.statement_for(relation, sql, params);
    }

    /// Whether DDL of table `relation` waits among the steps not yet taken.
    pub(crate) fn ddl_queued(&self, relation: u32) -> bool {
        self.ddl_tables.contains(&relation)
    }

    /// A statement that must run after everything so far (e.g. a TRUNCATE
    /// of several tables).
    pub(crate) fn statement(&mut self, sql: String, params: Vec<Param>) {
        self.flush();
        self.push(sql, params);
    }

    fn push(&mut self, sql: String, params: Vec<Param>) {
        self.buffered += sql.len() + params.iter().map(|p| p.text().map_or(0, str::len)).sum::<usize>();
        self.steps.push(Step::Sql(sql, params));
    }

    /// Turns one table's open groups into steps (inserts first, see
    /// [`beside`]).
    pub(crate) fn flush_table(&mut self, relation: u32) {
        let mut mine = Vec::new();
        let mut i = 0;
        while i < self.groups.len() {
            if self.groups[i].1.relation == relation {
                mine.push(self.groups.remove(i));
            } else {
                i += 1;
            }
        }
        self.emit(mine);
    }

    /// Turns every open group into steps.
    pub(crate) fn flush(&mut self) {
        let all = std::mem::take(&mut self.groups);
        self.emit(all);
    }

    fn emit(&mut self, mut groups: Vec<(Arc<RelationState>, Group)>) {
        // Stable: inserts first, the rest in the order the groups opened
        // (groups of different tables commute).
        groups.sort_by_key(|(_, g)| g.kind != GroupKind::Insert);
        for (rel, group) in groups {
            if !group.rows.is_empty() {
                self.steps.extend(group_steps(&rel, &group));
            }
        }
    }

    /// Everything held, as steps in order; the batch is empty after.
    pub(crate) fn take_steps(&mut self) -> Vec<Step> {
        self.flush();
        self.buffered = 0;
        self.ddl_tables.clear();
        std::mem::take(&mut self.steps)
    }
}

/// Whether a group of `kind` may open beside `other`, the table's open
/// group, instead of ending it: inserts beside updates (either opened
/// first) of a table whose only unique index is its key
/// ([`RelationState::reorder`]). Both are applied inserts first, then updates. That is the
/// order of the stream for every row they share: an update of a row
/// inserted earlier in the batch finds it, and an insert of a key updated
/// earlier cannot happen without a delete in between, which ends the
/// groups (and is checked in [`Batch::change`]). Rows they do not share
/// commute: no other unique index can see a transient duplicate, and cache
/// tables have no foreign keys and no row triggers of ours. This turns
/// merged transactions that each insert and update one table (alternating
/// kinds) into two statements instead of two per transaction.
fn beside(rel: &Arc<RelationState>, kind: &GroupKind, other: &(Arc<RelationState>, Group)) -> bool {
    rel.reorder
        && Arc::ptr_eq(rel, &other.0)
        && matches!(
            (kind, &other.1.kind),
            (GroupKind::Insert, GroupKind::Update(_)) | (GroupKind::Update(_), GroupKind::Insert)
        )
}

/// Enum values of `row` whose label is not known locally: (type, remote
/// type OID) of each such column.
pub(crate) fn missing_labels(
    rel: &RelationState,
    row: &Tuple,
    labels: &HashMap<String, HashSet<Bytes>>,
) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for (j, type_name, oid) in &rel.enum_columns {
        if let Some(Value::Text(label)) = row.get(*j)
            && labels.get(type_name).is_some_and(|known| !known.contains(label))
            && !out.iter().any(|(t, _)| t == type_name)
        {
            out.push((type_name.clone(), *oid));
        }
    }
    out
}
