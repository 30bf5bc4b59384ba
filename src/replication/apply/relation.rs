//! Relation messages: mapping the remote's tables onto local ones, and
//! following their schema changes upstream in WAL order (see
//! `docs/schema-changes.md`). The decisions are pure ([`super::columns`]);
//! this part reads the catalogs (the remote's, over a catalog connection
//! kept for the session, and the local one) and queues the DDL.
//!
//! A Relation message is acted on lazily, at the table's first change that
//! applies: a message inside a transaction that is skipped (applied before
//! a restart, or older than the table's copy) may describe an older shape
//! than the local table's, and the shape that matters is the one of the
//! next applied change.

use super::columns::{self, ColumnChange, NewColumn};
use super::facts::CatalogFacts;
use super::*;
use crate::replication::schema::qualified;

impl Applier {
    async fn catalog(&mut self) -> Result<&tokio_postgres::Client, ReplicationError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            self.catalog = Some(crate::replication::remote_client(&self.source).await?);
        }
        Ok(self.catalog.as_ref().expect("just connected"))
    }

    /// Notes a table's description; acted on at its next applied change.
    pub(super) async fn relation(&mut self, rel: Relation) -> Result<(), ReplicationError> {
        // Facts that follow in the stream are about this message.
        self.stream_facts.remove(&rel.id);
        if !self.tables.contains_key(&rel.id) {
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), "changes for a table added to the publication; it will be copied");
            self.relations.remove(&rel.id);
            self.unknown.insert(rel.id, rel);
            return Ok(());
        }
        self.stashed.insert(rel.id, rel);
        Ok(())
    }

    /// The table's description for a change that applies, after acting on
    /// a Relation message received since the last one. `None`: not
    /// replicated any more, or being copied again.
    pub(super) async fn relation_for(&mut self, id: u32) -> Result<Option<Arc<RelationState>>, ReplicationError> {
        if let Some(rel) = self.stashed.remove(&id) {
            self.follow(rel).await?;
        }
        match self.relations.get(&id) {
            Some(rel) => Ok(Some(rel.clone())),
            None if self.unknown.contains_key(&id) => Ok(None),
            None => Err(ReplicationError::fatal(format!("change for relation {id} before its Relation message"))),
        }
    }

    /// The catalog facts about `rel`, sent in transaction `xid`: read from
    /// the remote now (slot-fed), or those the publisher put next to the
    /// message in the stream (stream-fed; `None` in records of a publisher
    /// that did not send them yet).
    async fn facts_for(&mut self, rel: &Relation, xid: u32) -> Result<Option<Arc<CatalogFacts>>, ReplicationError> {
        if self.remote_catalog {
            let client = self.catalog().await?;
            return Ok(Some(Arc::new(CatalogFacts::read(client, rel, xid).await?)));
        }
        Ok(self.stream_facts.get(&rel.id).filter(|f| f.type_names.len() == rel.columns.len()).cloned())
    }

    /// Brings the local table to the shape `rel` describes.
    async fn follow(&mut self, rel: Relation) -> Result<(), ReplicationError> {
        let Some(known) = self.tables.get(&rel.id).cloned() else { return Ok(()) };
        // The local catalog is read below: the piece in flight (maybe DDL
        // of this table) must have run.
        if let Some(pending) = self.pending.as_mut() {
            let reordered = pending.batch.reordered > 0;
            pending.settle().await.map_err(|e| retry_in_order(e, reordered))?;
        }
        let xid = self.pending.as_ref().map_or(0, |p| p.xid);
        let Some(facts) = self.facts_for(&rel, xid).await? else {
            return self.follow_unchanged(rel, &known).await;
        };
        let new_columns = facts.new_columns(&rel);
        let current = new_columns.iter().all(|c| c.attnum.is_some());

        // The local catalog does not show DDL queued but not run yet: it is
        // read under the name the table had before this message.
        let local_name = qualified(&known.schema, &known.name);
        let mut qualified_name = local_name.clone();
        let old_view = match self.relations.get(&rel.id) {
            Some(state) => state.columns.clone(),
            None => self.local_columns(&local_name).await?,
        };
        if (known.schema.as_str(), known.name.as_str()) != (rel.namespace.as_str(), rel.name.as_str()) {
            qualified_name = self.rename_table(rel.id, &known, &rel.namespace, &rel.name)?;
        }
        tracing::debug!(table = %qualified_name, current, ?old_view, ?new_columns, "Relation message");
        let (mut changes, columns) = match columns::plan(&old_view, &new_columns) {
            Ok(plan) => plan,
            Err(reason) => return self.recopy(rel, &reason),
        };
        let mut user_types = match facts.fill_adds(&mut changes) {
            Ok(types) => types,
            Err(reason) => return self.recopy(rel, &reason),
        };
        for change in &changes {
            let ColumnChange::Retype { name, from_type, type_name } = change else { continue };
            if !self.converts_in_place(from_type, type_name).await? {
                return self.recopy(rel, &retype_reason(name, from_type, type_name));
            }
            if let Some(c) = rel.columns.iter().find(|c| &c.name == name)
                && c.type_oid >= 16384
            {
                user_types.push(c.type_oid);
            }
        }
        if !changes.is_empty() {
            tracing::info!(table = %qualified_name, ?changes, "schema changed upstream; following it");
        }
        if !user_types.is_empty() {
            let script = facts.type_script(&user_types);
            // One statement per line.
            for sql in script.lines() {
                self.batch()?.ddl_for(rel.id, sql.trim_end_matches(';').to_owned(), vec![]);
            }
        }
        for sql in columns::ddl(&qualified_name, &old_view, &changes) {
            self.batch()?.ddl_for(rel.id, sql, vec![]);
        }
        if let Some(indexes) = &facts.indexes {
            self.follow_indexes(rel.id, indexes, &local_name, &qualified_name).await?;
        }
        let enum_columns = self.enum_columns(&rel, &facts, &new_columns).await?;
        let key: Vec<usize> = rel.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        // DDL queued (by this message or an earlier one of this local
        // transaction) is not in the local catalog yet: no reordering for
        // this table until a later Relation message finds it run.
        let reorder = !self.batch()?.ddl_queued(rel.id) && self.may_reorder(&rel, &key, &local_name).await?;
        let table = self.tables.get(&rel.id).cloned().expect("checked above");
        let state = RelationState {
            column_names: columns.iter().map(|c| c.name.clone()).collect(),
            schema: table.schema,
            name: table.name,
            qualified: qualified_name,
            columns,
            full_identity: rel.replica_identity == b'f',
            key,
            enum_columns,
            reorder,
        };
        // The table's grouped changes were described by the old message.
        self.batch()?.flush_table(rel.id);
        self.relations.insert(rel.id, Arc::new(state));
        Ok(())
    }

    /// [`Self::follow`] without a remote catalog (a stream-fed cache): the
    /// message must describe the local table as it is, column for column.
    async fn follow_unchanged(&mut self, rel: Relation, known: &KnownTable) -> Result<(), ReplicationError> {
        let local_name = qualified(&known.schema, &known.name);
        let columns = match self.relations.get(&rel.id) {
            Some(state) => state.columns.clone(),
            None => self.local_columns(&local_name).await?,
        };
        let same_table = (known.schema.as_str(), known.name.as_str()) == (rel.namespace.as_str(), rel.name.as_str());
        let same_columns =
            columns.len() == rel.columns.len() && columns.iter().zip(&rel.columns).all(|(l, r)| l.name == r.name);
        let same_types = same_columns && self.same_builtin_types(&rel, &columns).await?;
        if !same_table || !same_types {
            return Err(ReplicationError::needs_operator(
                format!(
                    "{local_name}: its schema changed upstream, which a cache fed by a fan-out stream cannot follow yet"
                ),
                "start this cache again from a newer snapshot (remove its data directory and run `pglite-cache sync --nats` again)",
            ));
        }
        let key: Vec<usize> = rel.columns.iter().enumerate().filter(|(_, c)| c.is_key).map(|(i, _)| i).collect();
        let reorder = self.may_reorder(&rel, &key, &local_name).await?;
        let state = RelationState {
            column_names: columns.iter().map(|c| c.name.clone()).collect(),
            schema: known.schema.clone(),
            name: known.name.clone(),
            qualified: local_name,
            columns,
            full_identity: rel.replica_identity == b'f',
            key,
            enum_columns: Vec::new(),
            reorder,
        };
        self.batch()?.flush_table(rel.id);
        self.relations.insert(rel.id, Arc::new(state));
        Ok(())
    }

    /// Whether the columns of built-in types (same OIDs everywhere) have the
    /// local table's types: `ALTER COLUMN ... TYPE` rewrites the remote table
    /// without sending its rows, so applying on into the old type would
    /// silently diverge. Columns of user types (other OIDs locally) are
    /// compared by name only.
    async fn same_builtin_types(&self, rel: &Relation, columns: &[LocalColumn]) -> Result<bool, ReplicationError> {
        let builtin: Vec<(usize, u32, i32)> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.type_oid < 16384)
            .map(|(i, c)| (i, c.type_oid, c.type_modifier))
            .collect();
        if builtin.is_empty() {
            return Ok(true);
        }
        let list = |f: &dyn Fn(&(usize, u32, i32)) -> String| {
            format!("{{{}}}", builtin.iter().map(f).collect::<Vec<_>>().join(","))
        };
        let sql = "SELECT format_type(t.oid, t.typmod) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, i) ORDER BY t.i";
        let params = vec![Param::Untyped(list(&|c| c.1.to_string())), Param::Untyped(list(&|c| c.2.to_string()))];
        let result = self.local_query(sql, params).await?;
        Ok(builtin.iter().zip(&result.rows).all(|((i, _, _), row)| columns[*i].type_name == row.get::<String>(0)))
    }

    /// The local DDL (queued) for a table renamed or moved upstream, and
    /// its bookkeeping. Returns the new qualified name.
    fn rename_table(
        &mut self,
        id: u32,
        known: &KnownTable,
        schema: &str,
        name: &str,
    ) -> Result<String, ReplicationError> {
        let old = qualified(&known.schema, &known.name);
        tracing::info!(from = %old, to = %qualified(schema, name), "table renamed upstream; renaming it");
        let mut sql = Vec::new();
        if known.schema != schema {
            sql.push(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)));
            sql.push(format!("ALTER TABLE {old} SET SCHEMA {}", quote_ident(schema)));
        }
        if known.name != name {
            sql.push(format!("ALTER TABLE {} RENAME TO {}", qualified(schema, &known.name), quote_ident(name)));
        }
        let batch = self.batch()?;
        for s in sql {
            batch.ddl_for(id, s, vec![]);
        }
        batch.statement_for(
            id,
            "UPDATE pglite_cache.tables SET schema_name = $1, table_name = $2 WHERE remote_oid = $3".into(),
            vec![
                Param::Untyped(schema.into()),
                Param::Untyped(name.into()),
                Param::typed(crate::oid::OID, id.to_string()),
            ],
        );
        let (old_schema, old_name) = (known.schema.clone(), known.name.clone());
        let (new_schema, new_name) = (schema.to_owned(), name.to_owned());
        self.status.send_modify(|s| {
            for t in s.tables.iter_mut().filter(|t| t.schema == old_schema && t.name == old_name) {
                t.schema = new_schema.clone();
                t.name = new_name.clone();
            }
        });
        let entry = self.tables.get_mut(&id).expect("known table");
        entry.schema = schema.to_owned();
        entry.name = name.to_owned();
        Ok(qualified(schema, name))
    }

    /// A change that cannot be followed in place: the table is copied again
    /// (the backfill, as for a table added to the publication), its old
    /// copy readable until the new one replaces it in one transaction. Its
    /// changes are skipped until then (the new copy contains them); the
    /// mark is committed with the changes before it, so a restart in
    /// between copies it too.
    ///
    /// A stream-fed cache has no remote to copy from: it does so only when
    /// the publisher marked the message (it made the same decision and
    /// puts the table's copy in the stream after it, see
    /// `stream::catalog`); otherwise it halts rather than diverge.
    fn recopy(&mut self, rel: Relation, reason: &str) -> Result<(), ReplicationError> {
        let id = rel.id;
        let copy_follows = self.stream_facts.get(&id).is_some_and(|f| f.copy_follows);
        if !self.remote_catalog && !copy_follows {
            let table = self.tables.get(&id).map(|t| qualified(&t.schema, &t.name)).unwrap_or_default();
            return Err(ReplicationError::needs_operator(
                format!(
                    "{table}: {reason}; the publisher did not put a new copy of the table in the stream \
                     (it decides so for a change it saw in its current session), and a cache fed by a fan-out \
                     stream cannot copy a table itself"
                ),
                "start the fan-out again on a new stream (a publisher with a new --data directory and --stream); \
                 its caches start from its first snapshot",
            ));
        }
        let table = self.tables.remove(&id).expect("known table");
        tracing::warn!(table = %qualified(&table.schema, &table.name), %reason, "schema change upstream cannot be followed in place; copying the table again");
        self.batch()?.statement_for(
            id,
            "UPDATE pglite_cache.tables SET state = 'recopy' WHERE remote_oid = $1".into(),
            vec![Param::typed(crate::oid::OID, id.to_string())],
        );
        self.relations.remove(&id);
        self.unknown.insert(id, rel);
        self.status.send_modify(|s| s.tables.retain(|t| !(t.schema == table.schema && t.name == table.name)));
        Ok(())
    }

    /// The enum columns of `rel`, their labels brought up to date.
    async fn enum_columns(
        &mut self,
        rel: &Relation,
        facts: &CatalogFacts,
        columns: &[NewColumn],
    ) -> Result<Vec<(usize, String, u32)>, ReplicationError> {
        let mut out = Vec::new();
        for (j, c) in rel.columns.iter().enumerate() {
            if let Some(labels) = facts.labels(c.type_oid) {
                out.push((j, columns[j].type_name.clone(), c.type_oid));
                if !self.labels.contains_key(&columns[j].type_name) {
                    self.add_labels(&columns[j].type_name, labels.to_vec()).await?;
                }
            }
        }
        Ok(out)
    }

    /// Adds the labels of an enum that were added upstream (`ALTER TYPE ...
    /// ADD VALUE`, which sends no message), for a value whose label is not
    /// known here: the remote's labels now (slot-fed), or the newest the
    /// publisher put in the stream (it sends them again when it sees such a
    /// value).
    pub(super) async fn follow_labels(&mut self, type_name: &str, remote_oid: u32) -> Result<(), ReplicationError> {
        let remote = if self.remote_catalog {
            super::facts::read_labels(self.catalog().await?, remote_oid).await?
        } else {
            match self.stream_labels.get(&remote_oid) {
                Some(labels) => labels.clone(),
                None => return Err(ReplicationError::fatal(format!("no labels of enum {type_name} in the stream"))),
            }
        };
        self.add_labels(type_name, remote).await
    }

    /// Adds the labels of `remote` missing locally, at their place in the
    /// order, in a transaction of their own (a label cannot be used in the
    /// transaction that adds it), before the apply transaction that uses
    /// them.
    async fn add_labels(&mut self, type_name: &str, remote: Vec<String>) -> Result<(), ReplicationError> {
        let local = self
            .local_query(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = to_regtype($1) ORDER BY enumsortorder",
                vec![Param::Untyped(type_name.to_owned())],
            )
            .await?;
        let local: Vec<String> = local.rows.iter().map(|r| r.get(0)).collect();
        // A type not created yet locally is created with every label.
        let sql = if local.is_empty() { Vec::new() } else { columns::add_labels(type_name, &local, &remote) };
        if !sql.is_empty() {
            if self.pending.as_ref().is_some_and(|p| p.local.is_some()) {
                return Err(ReplicationError::transient(format!(
                    "enum {type_name} gained labels upstream, first used inside a transaction larger than max_buffered_bytes"
                )));
            }
            tracing::info!(%type_name, ?sql, "enum labels added upstream; adding them");
            self.instance.exec(&sql.join(";\n")).await?;
        }
        let labels = remote.into_iter().map(|l| Bytes::from(l.into_bytes())).collect();
        self.labels.insert(type_name.to_owned(), labels);
        Ok(())
    }

    /// Whether PostgreSQL converts `from` to `to` without a `USING`
    /// expression ([`super::facts::CONVERTS_IN_PLACE_SQL`]).
    /// A stream-fed cache asks its own engine (the built-in casts are the
    /// same; a user type is known by name once created here).
    async fn converts_in_place(&mut self, from: &str, to: &str) -> Result<bool, ReplicationError> {
        const SQL: &str = super::facts::CONVERTS_IN_PLACE_SQL;
        if !self.remote_catalog {
            let params = vec![Param::Untyped(from.to_owned()), Param::Untyped(to.to_owned())];
            let result = self.local_query(SQL, params).await?;
            return Ok(result.rows.first().and_then(|r| r.get::<Option<bool>>(0)).unwrap_or(false));
        }
        let row = self.catalog().await?.query_one(SQL, &[&from, &to]).await?;
        Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
    }

    /// Whether the apply may group the table's inserts and updates apart
    /// ([`RelationState::reorder`]): a key, not FULL identity, and no
    /// unique or exclusion index locally except on exactly the key's
    /// columns. A unique index created locally later, mid-session, can make
    /// a reordered batch fail with a unique violation: the apply then
    /// reconnects (transient) and the new session reads the indexes again.
    async fn may_reorder(&self, rel: &Relation, key: &[usize], local: &str) -> Result<bool, ReplicationError> {
        if key.is_empty() || rel.replica_identity == b'f' {
            return Ok(false);
        }
        let mut names: Vec<&str> = key.iter().map(|&i| rel.columns[i].name.as_str()).collect();
        names.sort_unstable();
        let rows: Vec<Vec<Value>> =
            names.iter().map(|n| vec![Value::Text(Bytes::copy_from_slice(n.as_bytes()))]).collect();
        let key_names = super::super::statements::column_arrays(&rows, 1).remove(0);
        let sql = "SELECT count(*)::int FROM pg_index i WHERE i.indrelid = $1::regclass \
                   AND (i.indisunique OR i.indisexclusion) \
                   AND (i.indpred IS NOT NULL OR i.indexprs IS NOT NULL OR i.indisexclusion \
                        OR (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE \"C\") FROM pg_attribute a \
                            WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) IS DISTINCT FROM $2::text[])";
        let result = self.local_query(sql, vec![Param::Untyped(local.to_owned()), key_names]).await?;
        Ok(result.rows.first().is_some_and(|r| r.get::<i32>(0) == 0))
    }

    /// The local table's columns, for a table seen for the first time in
    /// this session (attribute numbers unknown).
    async fn local_columns(&self, qualified: &str) -> Result<Vec<LocalColumn>, ReplicationError> {
        let sql = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                   WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";
        let result = self.local_query(sql, vec![Param::Untyped(qualified.to_owned())]).await?;
        Ok(result
            .rows
            .iter()
            .map(|r| LocalColumn { name: r.get::<String>(0), type_name: r.get::<String>(1), attnum: None })
            .collect())
    }

    /// Best effort: the local table gets the remote's indexes (by name) and
    /// loses those the remote dropped while this session watched it.
    /// Constraint indexes are left alone. The DDL runs after the local
    /// transaction commits ([`Self::follow_indexes_now`]).
    async fn follow_indexes(
        &mut self,
        id: u32,
        remote: &[(String, String)],
        local_name: &str,
        qualified_name: &str,
    ) -> Result<(), ReplicationError> {
        // Under a rename queued in this same local transaction the table is
        // not found yet: its indexes are looked at with its next message.
        let exists =
            self.local_query("SELECT to_regclass($1)::text", vec![Param::Untyped(local_name.to_owned())]).await?;
        if exists.rows.first().and_then(|r| r.get::<Option<String>>(0)).is_none() {
            return Ok(());
        }
        let local = self
            .local_query(
                "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = $1::regclass \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid)",
                vec![Param::Untyped(local_name.to_owned())],
            )
            .await?;
        let local: Vec<String> = local.rows.iter().map(|r| r.get(0)).collect();
        let schema = self.tables.get(&id).map(|t| t.schema.clone()).unwrap_or_default();
        for (name, def) in remote {
            if !local.iter().any(|l| l == name) {
                self.index_ddl.push((qualified_name.to_owned(), def.clone()));
            }
        }
        // Only indexes seen upstream earlier in this session are dropped: a
        // local index of the cache's own stays.
        let seen = self.remote_indexes.insert(id, remote.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
        for name in &local {
            if seen.contains(name) && !remote.iter().any(|(r, _)| r == name) {
                // Indexes live in their table's schema (moved with it).
                self.index_ddl
                    .push((qualified_name.to_owned(), format!("DROP INDEX IF EXISTS {}", qualified(&schema, name))));
            }
        }
        Ok(())
    }

    /// Runs the index DDL noted by [`Self::follow_indexes`], each statement
    /// on its own after the apply transaction committed: one that fails
    /// (an operator class or function the cache lacks, a definition naming
    /// the table by a newer name than the local one) is skipped with a
    /// warning and tried again at the table's next Relation message. Not
    /// inside the apply transaction with a PL/pgSQL exception block: this
    /// engine cannot catch an error there (see `docs/operating.md`).
    pub(super) async fn follow_indexes_now(&mut self) -> Result<(), ReplicationError> {
        for (table, sql) in std::mem::take(&mut self.index_ddl) {
            match self.instance.query(&sql, &[]).await {
                Ok(_) => tracing::info!(%table, %sql, "index changed upstream; followed"),
                Err(e) if e.code().is_some() => {
                    tracing::warn!(%table, %sql, error = %e, "could not follow an index change locally; skipped")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn local_query(&self, sql: &str, params: Vec<Param>) -> Result<crate::QueryResult, ReplicationError> {
        let local = self.pending.as_ref().and_then(|p| p.local.as_ref());
        Ok(match local {
            Some(tx) => tx.query_params(sql, params).await?,
            None => self.instance.query_params(sql, params).await?,
        })
    }
}

/// Why a column whose type changed upstream makes the table be copied again.
pub(crate) fn retype_reason(name: &str, from: &str, to: &str) -> String {
    format!("column {name} changed type upstream from {from} to {to}")
}
