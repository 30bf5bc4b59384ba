//! The published tables as the remote's catalog describes them, and the DDL
//! that recreates them locally: schemas, enum/domain/composite types, tables
//! with their columns, types and NOT NULL, then (after the bulk load, which
//! is faster without them) primary keys, unique constraints and the
//! remote's secondary indexes.
//!
//! Requires a PostgreSQL 15+ remote (`pg_publication_tables.attnames` and
//! `rowfilter`: column lists and row filters are honoured). Types from
//! extensions (citext, hstore, PostGIS) are not created: a table using one
//! fails to be created locally with the engine's error.

use std::collections::HashSet;

use tokio_postgres::GenericClient;

use super::error::ReplicationError;
use super::source::{quote_ident, quote_literal};

/// One published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// The remote table's OID.
    pub remote_oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `r` table, `p` partitioned table.
    pub relkind: i8,
    /// Published columns (the publication's column list, if any).
    pub columns: Vec<ColumnSchema>,
    /// The publication's row filter, if any (an SQL expression).
    pub row_filter: Option<String>,
    /// `ALTER TABLE ... ADD CONSTRAINT` bodies for the primary key and unique
    /// constraints: (name, definition).
    pub constraints: Vec<(String, String)>,
    /// `CREATE INDEX` statements of the other indexes.
    pub indexes: Vec<String>,
}

/// One column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSchema {
    /// Name.
    pub name: String,
    /// The type as `format_type` prints it (`numeric(10,2)`, `mood[]`).
    pub type_name: String,
    /// NOT NULL.
    pub not_null: bool,
    /// The binary COPY format of the type carries no type OIDs that differ
    /// between the remote and the cache (built-in types, enums, domains over
    /// them; not arrays of user types nor composites).
    pub binary_safe: bool,
}

impl TableSchema {
    /// `"schema"."name"`.
    pub fn qualified(&self) -> String {
        qualified(&self.schema, &self.name)
    }

    /// `"a", "b"`.
    pub fn column_list(&self) -> String {
        self.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    /// `CREATE TABLE` without constraints or indexes.
    pub fn create_table_sql(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("{} {}{}", quote_ident(&c.name), c.type_name, if c.not_null { " NOT NULL" } else { "" }))
            .collect();
        format!("CREATE TABLE {} ({})", self.qualified(), cols.join(", "))
    }

    /// Whether the initial copy can use the binary COPY format (about twice
    /// as fast to load as text).
    pub fn binary_copy(&self) -> bool {
        self.columns.iter().all(|c| c.binary_safe)
    }

    /// The statement that reads the table's published rows on the remote.
    pub fn copy_out_sql(&self) -> String {
        let only = if self.relkind == b'p' as i8 { "" } else { "ONLY " };
        let filter = self.row_filter.as_ref().map(|f| format!(" WHERE {f}")).unwrap_or_default();
        let format = if self.binary_copy() { " (FORMAT binary)" } else { "" };
        format!("COPY (SELECT {} FROM {only}{}{filter}) TO STDOUT{format}", self.column_list(), self.qualified())
    }

    /// The statement that bulk-loads a batch locally (into a table created
    /// in the same transaction, hence `FREEZE`).
    pub fn copy_in_sql(&self) -> String {
        let format = if self.binary_copy() { ", FORMAT binary" } else { "" };
        format!("COPY {} ({}) FROM '/dev/blob' WITH (FREEZE{format})", self.qualified(), self.column_list())
    }
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A user-defined type a published column needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSchema {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `CREATE TYPE` / `CREATE DOMAIN` statement.
    pub create_sql: String,
}

/// Reads the publication's tables (and the types they use) from the remote,
/// with `client` inside the snapshot transaction so that the description
/// matches the data.
pub async fn describe_publication(
    client: &impl GenericClient,
    publication: &str,
) -> Result<(Vec<TypeSchema>, Vec<TableSchema>), ReplicationError> {
    let exists = client.query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication]).await?;
    if exists.is_empty() {
        return Err(ReplicationError::needs_operator(
            format!("publication {publication:?} does not exist on the remote"),
            "create it (CREATE PUBLICATION ... FOR TABLE ...) or list tables so that one is created",
        ));
    }
    let rows = client
        .query(
            "SELECT c.oid, pt.schemaname::text, pt.tablename::text, c.relkind, pt.attnames::text[], pt.rowfilter \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await?;
    let mut tables = Vec::new();
    let mut types = Vec::new();
    let mut seen_types = HashSet::new();
    for row in rows {
        let oid: u32 = row.get(0);
        let attnames: Option<Vec<String>> = row.get(4);
        let table = describe_table(client, oid, row.get(1), row.get(2), row.get(3), attnames, row.get(5)).await?;
        for type_oid in column_type_oids(client, oid).await? {
            collect_type(client, type_oid, &mut seen_types, &mut types).await?;
        }
        tables.push(table);
    }
    Ok((types, tables))
}

async fn describe_table(
    client: &impl GenericClient,
    oid: u32,
    schema: String,
    name: String,
    relkind: i8,
    attnames: Option<Vec<String>>,
    row_filter: Option<String>,
) -> Result<TableSchema, ReplicationError> {
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    (SELECT b.oid < 16384 OR b.typtype = 'e' FROM pg_type t \
                     JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                     WHERE t.oid = a.atttypid) \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let published = |n: &str| attnames.as_ref().is_none_or(|names| names.iter().any(|a| a == n));
    let columns: Vec<ColumnSchema> = cols
        .iter()
        .map(|r| ColumnSchema {
            name: r.get(0),
            type_name: r.get(1),
            not_null: r.get(2),
            binary_safe: r.get::<_, Option<bool>>(3).unwrap_or(false),
        })
        .filter(|c| published(&c.name))
        .collect();
    let constraints = client
        .query(
            "SELECT c.conname::text, pg_get_constraintdef(c.oid), \
                    ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)) \
             FROM pg_constraint c WHERE c.conrelid = $1 AND c.contype IN ('p', 'u') ORDER BY c.contype, c.conname",
            &[&oid],
        )
        .await?
        .iter()
        .filter(|r| r.get::<_, Vec<String>>(2).iter().all(|c| published(c)))
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let indexes = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid), \
                    ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)), \
                    i.indexprs IS NULL AND i.indpred IS NULL \
             FROM pg_index i WHERE i.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid) \
             ORDER BY i.indexrelid",
            &[&oid],
        )
        .await?
        .iter()
        // Expression and partial indexes are taken as they are (they fail
        // locally, with a warning, if they use what the cache lacks).
        .filter(|r| !r.get::<_, bool>(2) || r.get::<_, Vec<String>>(1).iter().all(|c| published(c)))
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok(TableSchema { remote_oid: oid, schema, name, relkind, columns, row_filter, constraints, indexes })
}

async fn column_type_oids(client: &impl GenericClient, oid: u32) -> Result<Vec<u32>, ReplicationError> {
    Ok(client
        .query(
            "SELECT DISTINCT a.atttypid FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Adds the type (after the types it depends on) if it is user-defined.
async fn collect_type(
    client: &impl GenericClient,
    oid: u32,
    seen: &mut HashSet<u32>,
    out: &mut Vec<TypeSchema>,
) -> Result<(), ReplicationError> {
    // Built-in types have OIDs below FirstNormalObjectId.
    if oid < 16384 || !seen.insert(oid) {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT n.nspname::text, t.typname::text, t.typtype, t.typelem, t.typbasetype, \
                    format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typrelid, t.typcategory, \
                    ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder), \
                    ARRAY(SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contypid = t.oid ORDER BY c.conname) \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let schema: String = row.get(0);
    let name: String = row.get(1);
    let typtype: i8 = row.get(2);
    let elem: u32 = row.get(3);
    let category: i8 = row.get(8);
    let full = qualified(&schema, &name);
    let create_sql = match typtype as u8 {
        b'b' if category as u8 == b'A' && elem != 0 => {
            // An array of a user type: only the element type is needed.
            return Box::pin(collect_type(client, elem, seen, out)).await;
        }
        b'e' => {
            let labels: Vec<String> = row.get(9);
            let labels: Vec<String> = labels.iter().map(|l| quote_literal(l)).collect();
            format!("CREATE TYPE {full} AS ENUM ({})", labels.join(", "))
        }
        b'd' => {
            let base: u32 = row.get(4);
            Box::pin(collect_type(client, base, seen, out)).await?;
            let base_name: String = row.get(5);
            let not_null: bool = row.get(6);
            let checks: Vec<String> = row.get(10);
            format!(
                "CREATE DOMAIN {full} AS {base_name}{}{}",
                if not_null { " NOT NULL" } else { "" },
                checks.iter().map(|c| format!(" {c}")).collect::<String>()
            )
        }
        b'c' => {
            let relid: u32 = row.get(7);
            let attrs = client
                .query(
                    "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    &[&relid],
                )
                .await?;
            let mut fields = Vec::new();
            for a in &attrs {
                Box::pin(collect_type(client, a.get(1), seen, out)).await?;
                fields.push(format!("{} {}", quote_ident(a.get(0)), a.get::<_, String>(2)));
            }
            format!("CREATE TYPE {full} AS ({})", fields.join(", "))
        }
        // Base types from extensions, ranges, multiranges: not created here.
        _ => return Ok(()),
    };
    out.push(TypeSchema { schema, name, create_sql });
    Ok(())
}

/// The user types among `oids` and those they use, for [`create_script`]
/// (a column added or retyped upstream).
pub async fn describe_types(client: &impl GenericClient, oids: &[u32]) -> Result<Vec<TypeSchema>, ReplicationError> {
    let mut seen = HashSet::new();
    let mut types = Vec::new();
    for &oid in oids {
        collect_type(client, oid, &mut seen, &mut types).await?;
    }
    Ok(types)
}

/// The local DDL that creates the schemas and types (tables are created one
/// by one, each in the transaction that loads it, which also drops an
/// older copy: readers see the old copy until the new one is committed).
pub fn create_script(types: &[TypeSchema], tables: &[TableSchema]) -> String {
    let mut sql = String::new();
    let mut schemas: Vec<&str> =
        types.iter().map(|t| t.schema.as_str()).chain(tables.iter().map(|t| t.schema.as_str())).collect();
    schemas.sort_unstable();
    schemas.dedup();
    for s in schemas {
        sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(s)));
    }
    for t in types {
        // Keep a type that exists already (e.g. from an earlier sync).
        sql.push_str(&format!(
            "DO $pglite_cache$ BEGIN IF to_regtype({}) IS NULL THEN EXECUTE {}; END IF; END $pglite_cache$;\n",
            quote_literal(&qualified(&t.schema, &t.name)),
            quote_literal(&t.create_sql)
        ));
    }
    sql
}

/// Statements that add the constraints (run after the bulk load). Each runs
/// on its own so that one failing index does not stop the others.
pub fn constraint_statements(table: &TableSchema) -> Vec<String> {
    table
        .constraints
        .iter()
        .map(|(name, def)| format!("ALTER TABLE {} ADD CONSTRAINT {} {def}", table.qualified(), quote_ident(name)))
        .collect()
}

/// The trigger that makes a replicated table read-only for everything but
/// the apply (which runs with `session_replication_role = replica`, where
/// ordinary triggers don't fire).
pub fn read_only_trigger_sql(table: &TableSchema) -> String {
    format!(
        "CREATE TRIGGER pglite_cache_read_only BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} \
         FOR EACH STATEMENT EXECUTE FUNCTION pglite_cache.refuse_write()",
        table.qualified()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_ddl_and_copy_statements() {
        let t = TableSchema {
            remote_oid: 1,
            schema: "public".into(),
            name: "Odd \"name\"".into(),
            relkind: b'r' as i8,
            columns: vec![
                ColumnSchema { name: "id".into(), type_name: "integer".into(), not_null: true, binary_safe: true },
                ColumnSchema { name: "v".into(), type_name: "mood[]".into(), not_null: false, binary_safe: false },
            ],
            row_filter: Some("(id > 10)".into()),
            constraints: vec![("t_pkey".into(), "PRIMARY KEY (id)".into())],
            indexes: vec![],
        };
        assert_eq!(t.create_table_sql(), r#"CREATE TABLE "public"."Odd ""name""" ("id" integer NOT NULL, "v" mood[])"#);
        assert_eq!(
            t.copy_out_sql(),
            r#"COPY (SELECT "id", "v" FROM ONLY "public"."Odd ""name""" WHERE (id > 10)) TO STDOUT"#
        );
        assert_eq!(
            constraint_statements(&t)[0],
            r#"ALTER TABLE "public"."Odd ""name""" ADD CONSTRAINT "t_pkey" PRIMARY KEY (id)"#
        );
        // Arrays of user types carry type OIDs in binary: text format then.
        assert!(!t.binary_copy());
        assert!(t.copy_in_sql().ends_with("WITH (FREEZE)"));
        let mut b = t.clone();
        b.columns.truncate(1);
        assert!(b.copy_out_sql().ends_with("TO STDOUT (FORMAT binary)"));
        assert!(b.copy_in_sql().ends_with("WITH (FREEZE, FORMAT binary)"));
    }
}
