//! Relation messages: mapping the remote's tables onto local ones, and
//! following schema changes upstream (added columns are added locally;
//! dropped, renamed or retyped columns halt with a hint to resync).

use super::*;

impl Applier {
    async fn catalog(&mut self) -> Result<&tokio_postgres::Client, ReplicationError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            self.catalog = Some(crate::replication::remote_client(&self.source).await?);
        }
        Ok(self.catalog.as_ref().expect("just connected"))
    }

    /// How existing rows see a column added upstream: `Some(value)` when the
    /// remote stored a "missing value" for it (a non-volatile default: every
    /// existing row reads it), `None` when they read NULL.
    async fn added_column_fill(
        &mut self,
        relation: u32,
        table: &str,
        column: &str,
    ) -> Result<Option<String>, ReplicationError> {
        let row = self
            .catalog()
            .await?
            .query_opt(
                "SELECT a.atthasmissing, (a.attmissingval::text::text[])[1], d.adbin IS NOT NULL \
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
                &[&relation, &column],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (has_missing, missing, has_default): (bool, Option<String>, bool) = (row.get(0), row.get(1), row.get(2));
        if has_missing {
            return Ok(missing);
        }
        if has_default {
            // A volatile default rewrote the table upstream (or a default was
            // set after adding the column): existing rows may hold values that
            // never went through replication.
            return Err(ReplicationError::needs_operator(
                format!("column {column} was added to {table} upstream with a default this cache cannot reproduce"),
                "call ReplicationHandle::resync() to copy the table as it is now",
            ));
        }
        Ok(None)
    }

    pub(super) async fn relation(&mut self, rel: Relation) -> Result<(), ReplicationError> {
        let Some(KnownTable { schema, name, applies_from }) = self.tables.get(&rel.id).cloned() else {
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), "changes for a table added to the publication; it will be copied");
            self.relations.remove(&rel.id);
            self.unknown.insert(rel.id, rel);
            return Ok(());
        };
        if (schema.as_str(), name.as_str()) != (rel.namespace.as_str(), rel.name.as_str()) {
            return Err(ReplicationError::needs_operator(
                format!("table {schema}.{name} was renamed upstream to {}.{}", rel.namespace, rel.name),
                "call ReplicationHandle::resync() to copy it under its new name",
            ));
        }
        let qualified = crate::replication::schema::qualified(&schema, &name);
        // Local columns as they are now (inside the open local transaction if any).
        let sql = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8, a.atttypmod \
                   FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
        let params = vec![Param::Untyped(qualified.clone())];
        let pending_local = self.pending.as_ref().and_then(|p| p.local.as_ref());
        let result = match pending_local {
            Some(tx) => tx.query_params(sql, params).await?,
            None => self.instance.query_params(sql, params).await?,
        };
        let local: Vec<(String, String, u32, i32)> = result
            .rows
            .iter()
            .map(|r| (r.get::<String>(0), r.get::<String>(1), r.get::<i64>(2) as u32, r.get::<i32>(3)))
            .collect();
        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut added = Vec::new();
        for col in &rel.columns {
            match local.iter().find(|l| l.0 == col.name) {
                Some((_, type_name, oid, typmod)) => {
                    // Built-in types keep their OIDs; user types differ by OID.
                    if col.type_oid < 16384 && (*oid != col.type_oid || *typmod != col.type_modifier) {
                        return Err(ReplicationError::needs_operator(
                            format!("column {} of {schema}.{name} changed type upstream", col.name),
                            "call ReplicationHandle::resync() to copy the table with its new type",
                        ));
                    }
                    columns.push(LocalColumn { name: col.name.clone(), type_name: type_name.clone() });
                }
                None => {
                    if col.type_oid >= 16384 {
                        return Err(ReplicationError::needs_operator(
                            format!("column {} of user-defined type was added to {schema}.{name} upstream", col.name),
                            "call ReplicationHandle::resync() to copy the table (only built-in types are added in place)",
                        ));
                    }
                    added.push(col);
                }
            }
        }
        if let Some(gone) = local.iter().find(|l| !rel.columns.iter().any(|c| c.name == l.0)) {
            return Err(ReplicationError::needs_operator(
                format!(
                    "column {} of {schema}.{name} was dropped or renamed upstream (or left the column list)",
                    gone.0
                ),
                "call ReplicationHandle::resync() to copy the table as it is now",
            ));
        }
        for col in added {
            let type_name = self
                .instance_query_one(
                    "SELECT format_type($1::oid, $2::int4)",
                    vec![
                        Param::typed(crate::oid::OID, col.type_oid.to_string()),
                        Param::typed(crate::oid::INT4, col.type_modifier.to_string()),
                    ],
                )
                .await?;
            let fill = self.added_column_fill(rel.id, &qualified, &col.name).await?;
            let column = quote_ident(&col.name);
            tracing::info!(table = %qualified, column = %col.name, ?fill, "column added upstream; adding it locally");
            self.flush_group()?;
            match fill {
                // Existing rows get the remote's missing value, later rows
                // carry their own.
                Some(value) => {
                    let ddl = format!(
                        "ALTER TABLE {qualified} ADD COLUMN {column} {type_name} DEFAULT {}::{type_name}",
                        crate::replication::source::quote_literal(&value)
                    );
                    self.push_statement(ddl, vec![]).await?;
                    self.push_statement(format!("ALTER TABLE {qualified} ALTER COLUMN {column} DROP DEFAULT"), vec![])
                        .await?;
                }
                None => {
                    self.push_statement(format!("ALTER TABLE {qualified} ADD COLUMN {column} {type_name}"), vec![])
                        .await?
                }
            }
            columns.push(LocalColumn { name: col.name.clone(), type_name });
        }
        // Keep the Relation message's column order.
        let columns: Vec<LocalColumn> = rel
            .columns
            .iter()
            .map(|c| columns.iter().find(|l| l.name == c.name).cloned().expect("every column was matched or added"))
            .collect();
        let key: Vec<usize> = rel.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        let state = RelationState {
            column_names: columns.iter().map(|c| c.name.clone()).collect(),
            schema,
            name,
            qualified,
            columns,
            full_identity: rel.replica_identity == b'f',
            key,
            applies_from,
        };
        // The table's grouped changes were described by the old message.
        self.flush_table(rel.id)?;
        self.relations.insert(rel.id, Arc::new(state));
        Ok(())
    }

    async fn instance_query_one(&self, sql: &str, params: Vec<Param>) -> Result<String, ReplicationError> {
        let local = self.pending.as_ref().and_then(|p| p.local.as_ref());
        let result = match local {
            Some(tx) => tx.query_params(sql, params).await?,
            None => self.instance.query_params(sql, params).await?,
        };
        Ok(result.rows.first().map(|r| r.get::<String>(0)).unwrap_or_default())
    }
}
