//! Query results: columns, rows, and per-statement results.

use std::sync::Arc;

use crate::convert::{FromValue, to_json};
use crate::error::{Error, Result};

/// A result column: its name and PostgreSQL type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column's name (its alias, if the query gave one).
    pub name: String,
    /// The OID of the column's type (see [`crate::oid`]).
    pub type_oid: u32,
}

/// One row of a result, with values in PostgreSQL's text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    columns: Arc<[Column]>,
    values: Vec<Option<String>>,
}

/// Something that picks a column of a row: its index or its name.
pub trait ColumnIndex {
    /// The position of the column, if the row has it.
    fn index_in(&self, columns: &[Column]) -> Option<usize>;
    /// How to name the column in an error.
    fn describe(&self) -> String;
}

impl ColumnIndex for usize {
    fn index_in(&self, columns: &[Column]) -> Option<usize> {
        (*self < columns.len()).then_some(*self)
    }
    fn describe(&self) -> String {
        format!("#{self}")
    }
}

impl ColumnIndex for &str {
    fn index_in(&self, columns: &[Column]) -> Option<usize> {
        columns.iter().position(|c| c.name == *self)
    }
    fn describe(&self) -> String {
        format!("\"{self}\"")
    }
}

impl Row {
    pub(crate) fn new(columns: Arc<[Column]>, values: Vec<Option<String>>) -> Row {
        Row { columns, values }
    }

    /// The row's columns.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// Number of values in the row.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True for a row with no columns (`SELECT FROM t`).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The value of a column converted to `T`.
    ///
    /// # Panics
    /// When the column does not exist or does not convert; use
    /// [`try_get`](Self::try_get) to get an error instead.
    pub fn get<T: FromValue>(&self, idx: impl ColumnIndex) -> T {
        match self.try_get(idx) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// The value of a column converted to `T`, or why it cannot be.
    pub fn try_get<T: FromValue>(&self, idx: impl ColumnIndex) -> Result<T> {
        let i = idx.index_in(&self.columns).ok_or_else(|| Error::ColumnNotFound(idx.describe()))?;
        let column = &self.columns[i];
        T::from_value(column.type_oid, self.values[i].as_deref())
            .map_err(|reason| Error::Conversion { column: format!("{} ({})", idx.describe(), column.name), reason })
    }

    /// The raw text of a column (`None` for NULL or a missing column).
    pub fn get_text(&self, idx: impl ColumnIndex) -> Option<&str> {
        idx.index_in(&self.columns).and_then(|i| self.values[i].as_deref())
    }

    /// The row's values as JSON, in column order (see [`crate::convert::to_json`]).
    pub fn to_json_array(&self) -> Vec<serde_json::Value> {
        self.columns.iter().zip(&self.values).map(|(c, v)| to_json(c.type_oid, v.as_deref())).collect()
    }

    /// The row as a JSON object keyed by column name.
    pub fn to_json(&self) -> serde_json::Value {
        let map = self.columns.iter().zip(self.to_json_array()).map(|(c, v)| (c.name.clone(), v)).collect();
        serde_json::Value::Object(map)
    }
}

/// The result of one statement.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueryResult {
    /// The result columns (empty for statements that return no rows).
    pub columns: Arc<[Column]>,
    /// The rows returned.
    pub rows: Vec<Row>,
    /// The command tag, e.g. `INSERT 0 1` or `SELECT 3`.
    pub command: String,
}

impl QueryResult {
    /// Rows inserted, updated, deleted, selected, copied... as the command tag
    /// reports them (0 for commands that report no count).
    pub fn rows_affected(&self) -> u64 {
        self.command.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// The command name, the first word of the tag (`INSERT`, `CREATE TABLE`...).
    pub fn command_name(&self) -> &str {
        self.command.trim_end_matches(|c: char| c.is_ascii_digit() || c == ' ')
    }

    /// True if the statement returns rows (it has a row description).
    pub fn has_rows(&self) -> bool {
        !self.columns.is_empty()
    }

    /// The first row, if any.
    pub fn first(&self) -> Option<&Row> {
        self.rows.first()
    }

    /// The result as JSON: `{"columns": [...], "rows": [[...]]}` for row
    /// results, `{"command": ..., "rows_affected": N}` otherwise.
    pub fn to_json(&self) -> serde_json::Value {
        if self.has_rows() {
            serde_json::json!({
                "columns": self.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                "rows": self.rows.iter().map(Row::to_json_array).collect::<Vec<_>>(),
            })
        } else {
            serde_json::json!({ "command": self.command_name(), "rows_affected": self.rows_affected() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tag_parts() {
        let r = QueryResult { command: "INSERT 0 3".into(), ..Default::default() };
        assert_eq!(r.rows_affected(), 3);
        assert_eq!(r.command_name(), "INSERT");
        let r = QueryResult { command: "CREATE TABLE".into(), ..Default::default() };
        assert_eq!(r.rows_affected(), 0);
        assert_eq!(r.command_name(), "CREATE TABLE");
    }
}
