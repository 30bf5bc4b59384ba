//! What the apply needs from the remote catalog to act on one Relation
//! message (see `docs/schema-changes.md`), read in one place for both kinds
//! of cache: a slot-fed cache reads it over its catalog connection when it
//! acts on the message; the fan-out publisher reads it when the walsender
//! sends the message and puts it in the stream next to it (a "facts frame"),
//! so a stream-fed cache follows schema changes without ever querying the
//! remote. The decisions made from it are the same code either way
//! ([`super::relation`], [`super::columns`]).
//!
//! A facts frame travels in a record like a pgoutput message, with a tag
//! pgoutput does not use:
//!
//! ```text
//! 'F' | version u8 | relation u32 | JSON of CatalogFacts
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::replication::error::ReplicationError;
use crate::replication::pgoutput::Relation;

use super::columns::{ColumnChange, NewColumn};

/// The first byte of a facts frame.
pub(crate) const TAG: u8 = b'F';
const VERSION: u8 = 1;

/// A column of the remote table as its catalog says (dropped ones left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RemoteColumn {
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "a")]
    pub attnum: i16,
    #[serde(rename = "o")]
    pub type_oid: u32,
    #[serde(rename = "m")]
    pub typmod: i32,
    /// `format_type` of the column's type.
    #[serde(rename = "t")]
    pub type_name: String,
    /// The "missing value" existing rows read (`atthasmissing`).
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none", with = "missing_value")]
    pub missing: Option<Option<String>>,
    #[serde(rename = "d", default, skip_serializing_if = "is_false")]
    pub has_default: bool,
    /// Written by the message's transaction or before it.
    #[serde(rename = "b", default, skip_serializing_if = "is_false")]
    pub by_then: bool,
}

/// An enum used by a column of the message, with its labels in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EnumLabels {
    #[serde(rename = "o")]
    pub oid: u32,
    #[serde(rename = "l")]
    pub labels: Vec<String>,
}

/// The remote catalog's facts about one Relation message, read after it
/// was sent, relative to the transaction it came in (`xid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CatalogFacts {
    /// The table's OID.
    #[serde(rename = "r")]
    pub relation: u32,
    /// Every `pg_attribute` row of the table (dropped ones included) is
    /// older than the message's transaction: a DDL committed after it
    /// would have a later xid (see docs/schema-changes.md).
    #[serde(rename = "c")]
    pub older: bool,
    /// The table's columns now.
    #[serde(rename = "k")]
    pub columns: Vec<RemoteColumn>,
    /// `format_type` of each column of the message, in its order.
    #[serde(rename = "t")]
    pub type_names: Vec<String>,
    /// Indexes that back no constraint: (name, definition); `None` in the
    /// lean facts of a repeated Relation message.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub indexes: Option<Vec<(String, String)>>,
    /// For each user type of the message's columns: the local DDL creating
    /// it and the types it uses ([`crate::replication::schema::create_script`]).
    #[serde(rename = "u", default, skip_serializing_if = "Vec::is_empty")]
    pub user_types: Vec<(u32, String)>,
    /// The enums among them, with their labels.
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    pub enums: Vec<EnumLabels>,
    /// Set by the publisher: the message is a change that cannot be
    /// followed in place, and the table's copy follows in the stream (a
    /// stream-fed cache copies it again as a slot-fed one does; unset, it
    /// halts). Only in the full facts (see [`Self::lean`]).
    #[serde(rename = "x", default, skip_serializing_if = "is_false")]
    pub copy_follows: bool,
}

/// Whether PostgreSQL converts `$1` to `$2` (type names) without a `USING`
/// expression (the same types, an assignment or implicit cast, or a string
/// target): then the remote did the same, unless it was given an
/// expression of its own (see docs/schema-changes.md).
pub(crate) const CONVERTS_IN_PLACE_SQL: &str = "SELECT s = t OR EXISTS (SELECT 1 FROM pg_cast c WHERE c.castsource = s AND c.casttarget = t \
     AND c.castcontext IN ('a', 'i')) \
     OR (SELECT typcategory = 'S' FROM pg_type WHERE oid = t) \
     FROM (SELECT to_regtype($1)::oid AS s, to_regtype($2)::oid AS t) x";

impl CatalogFacts {
    /// Reads the facts about `rel`, sent inside remote transaction `xid`.
    pub(crate) async fn read(
        client: &impl GenericClient,
        rel: &Relation,
        xid: u32,
    ) -> Result<CatalogFacts, ReplicationError> {
        let xid = xid.to_string();
        let older: bool = client
            .query_one(
                "SELECT coalesce(min(age(a.xmin)), 2147483647) > age($2::text::xid) \
                 FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0",
                &[&rel.id, &xid],
            )
            .await?
            .get(0);
        let columns = client
            .query(
                "SELECT a.attname::text, a.attnum, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod), \
                        a.atthasmissing, (a.attmissingval::text::text[])[1], d.adbin IS NOT NULL, \
                        age(a.xmin) >= age($2::text::xid) \
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&rel.id, &xid],
            )
            .await?
            .iter()
            .map(|r| RemoteColumn {
                name: r.get(0),
                attnum: r.get(1),
                type_oid: r.get(2),
                typmod: r.get(3),
                type_name: r.get(4),
                missing: if r.get::<_, bool>(5) { Some(r.get(6)) } else { None },
                has_default: r.get(7),
                by_then: r.get(8),
            })
            .collect();
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        let typmods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
        let type_names = client
            .query(
                "SELECT format_type(t.oid, t.typmod) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, i) \
                 ORDER BY t.i",
                &[&oids, &typmods],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let indexes = client
            .query(
                "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1 \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid) \
                 ORDER BY 1",
                &[&rel.id],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let indexes = Some(indexes);
        let mut user: Vec<u32> = oids.iter().copied().filter(|&o| o >= 16384).collect();
        user.sort_unstable();
        user.dedup();
        // A type dropped since (the publisher reads the catalog late when it
        // lags) cannot be described: left out rather than failing for good.
        let user: Vec<u32> = client
            .query("SELECT oid FROM pg_type WHERE oid = ANY($1) ORDER BY 1", &[&user])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut user_types = Vec::new();
        let mut enums = Vec::new();
        for oid in user {
            let types = crate::replication::schema::describe_types(client, &[oid]).await?;
            user_types.push((oid, crate::replication::schema::create_script(&types, &[])));
            let is_enum =
                client.query_opt("SELECT 1 FROM pg_type WHERE oid = $1 AND typtype = 'e'", &[&oid]).await?.is_some();
            if is_enum {
                enums.push(EnumLabels { oid, labels: read_labels(client, oid).await? });
            }
        }
        Ok(CatalogFacts {
            relation: rel.id,
            older,
            columns,
            type_names,
            indexes,
            user_types,
            enums,
            copy_follows: false,
        })
    }

    /// The message's columns with what the catalog adds. Its attribute
    /// numbers and missing values hold for the message (the catalog is read
    /// after the message was sent) if every column row is older than the
    /// transaction the message came in (a DDL committed after it took its
    /// lock after that transaction's commit, so got a later xid), and it
    /// matches.
    pub(in crate::replication) fn new_columns(&self, rel: &Relation) -> Vec<NewColumn> {
        let find = |c: &crate::replication::pgoutput::RelationColumn| {
            self.columns.iter().find(|r| r.name == c.name && r.type_oid == c.type_oid && r.typmod == c.type_modifier)
        };
        let current = self.older && rel.columns.iter().all(|c| find(c).is_some());
        rel.columns
            .iter()
            .zip(&self.type_names)
            .map(|(c, type_name)| {
                let (type_name, attnum) = match find(c) {
                    Some(r) if current => (r.type_name.clone(), Some(r.attnum)),
                    _ => (type_name.clone(), None),
                };
                NewColumn { name: c.name.clone(), type_name, attnum }
            })
            .collect()
    }

    /// Gives each column added by `changes` the value existing rows read
    /// (its missing value), or says why the table has to be copied again
    /// instead. Returns the user types of the added columns.
    pub(in crate::replication) fn fill_adds(&self, changes: &mut [ColumnChange]) -> Result<Vec<u32>, String> {
        let mut user_types = Vec::new();
        for change in changes {
            let ColumnChange::Add { name, type_name, fill } = change else { continue };
            // Added by this transaction or before: its missing value is the
            // one (unless added, dropped and added again in one transaction).
            let Some(r) = self.columns.iter().find(|r| &r.name == name && &r.type_name == type_name && r.by_then)
            else {
                return Err(format!("column {name} was added upstream and changed again since"));
            };
            match (&r.missing, r.has_default) {
                (Some(value), _) => *fill = value.clone(),
                // A volatile default rewrote the table upstream: existing
                // rows hold values that never went through replication.
                (None, true) => return Err(format!("column {name} was added upstream with a volatile default")),
                (None, false) => {}
            }
            if r.type_oid >= 16384 {
                user_types.push(r.type_oid);
            }
        }
        Ok(user_types)
    }

    /// What travels with the copies of the Relation message that the
    /// publisher repeats in later transactions (so that a cache can start
    /// at any of them): only what a cache whose table already has this
    /// shape needs (attribute numbers, type names, enum labels). Missing
    /// values, indexes and type definitions matter only where the message
    /// first appears, which every cache reads (a column added from these
    /// facts halts instead of guessing its missing value).
    pub(crate) fn lean(&self) -> CatalogFacts {
        let columns = self
            .columns
            .iter()
            .map(|c| RemoteColumn { missing: None, has_default: false, by_then: false, ..c.clone() })
            .collect();
        CatalogFacts { columns, indexes: None, user_types: Vec::new(), copy_follows: false, ..self.clone() }
    }

    /// The local DDL creating the user types `oids` (those known here).
    pub(crate) fn type_script(&self, oids: &[u32]) -> String {
        self.user_types.iter().filter(|(o, _)| oids.contains(o)).map(|(_, s)| s.as_str()).collect()
    }

    /// The labels of enum `oid`, if it is one of the message's.
    pub(crate) fn labels(&self, oid: u32) -> Option<&[String]> {
        self.enums.iter().find(|e| e.oid == oid).map(|e| e.labels.as_slice())
    }

    /// The frame that carries these facts in a fan-out record.
    pub(crate) fn encode(&self) -> Bytes {
        let json = serde_json::to_vec(self).expect("facts serialize");
        let mut out = BytesMut::with_capacity(6 + json.len());
        out.put_u8(TAG);
        out.put_u8(VERSION);
        out.put_u32(self.relation);
        out.put_slice(&json);
        out.freeze()
    }

    /// Reads a frame made by [`Self::encode`].
    pub(crate) fn decode(frame: &[u8]) -> Result<CatalogFacts, ReplicationError> {
        match frame {
            [TAG, VERSION, _, _, _, _, json @ ..] => serde_json::from_slice(json)
                .map_err(|e| ReplicationError::fatal(format!("malformed catalog facts in the stream: {e}"))),
            [TAG, version, ..] => Err(ReplicationError::fatal(format!(
                "catalog facts of version {version} in the stream; this version reads version {VERSION}: upgrade"
            ))),
            _ => Err(ReplicationError::fatal("not a catalog facts frame")),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A missing value that is NULL (`Some(None)`) as `[null]`: JSON's `null`
/// alone would read back as no missing value.
mod missing_value {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Option<String>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|m| [m]).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
        Ok(Option::<[Option<String>; 1]>::deserialize(d)?.map(|[m]| m))
    }
}

/// The relation a facts frame is about, without decoding it.
pub(crate) fn frame_relation(frame: &[u8]) -> Option<u32> {
    match frame {
        [TAG, _, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The labels of enum `oid`, in order.
pub(crate) async fn read_labels(client: &impl GenericClient, oid: u32) -> Result<Vec<String>, ReplicationError> {
    Ok(client
        .query("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder", &[&oid])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_facts_frame_round_trips_and_names_its_relation() {
        let facts = CatalogFacts {
            relation: 16390,
            older: true,
            columns: vec![
                RemoteColumn {
                    name: "n".into(),
                    attnum: 3,
                    type_oid: 20,
                    typmod: -1,
                    type_name: "bigint".into(),
                    missing: Some(Some("7".into())),
                    has_default: true,
                    by_then: true,
                },
                RemoteColumn {
                    name: "z".into(),
                    attnum: 4,
                    type_oid: 23,
                    typmod: -1,
                    type_name: "integer".into(),
                    missing: Some(None),
                    has_default: false,
                    by_then: false,
                },
            ],
            type_names: vec!["bigint".into(), "integer".into()],
            indexes: Some(vec![("t_n".into(), "CREATE INDEX t_n ON public.t USING btree (n)".into())]),
            user_types: vec![(16400, "CREATE TYPE ...;\n".into())],
            enums: vec![EnumLabels { oid: 16400, labels: vec!["a".into(), "b".into()] }],
            copy_follows: true,
        };
        let frame = facts.encode();
        assert_eq!(frame_relation(&frame), Some(16390));
        assert_eq!(CatalogFacts::decode(&frame).unwrap(), facts);
        assert_eq!(facts.labels(16400).unwrap(), ["a", "b"]);
        assert_eq!(facts.type_script(&[16400]), "CREATE TYPE ...;\n");
        assert_eq!(facts.type_script(&[1]), "");
        let lean = facts.lean();
        assert_eq!((&lean.indexes, lean.columns[0].by_then, lean.columns[0].attnum), (&None, false, 3));
        assert_eq!(lean.enums, facts.enums);
        // Only where the message first appears: a repeat never promises a copy.
        assert!(!lean.copy_follows);
        // Facts of an older publisher (no mark) read as unmarked.
        let old = String::from_utf8(frame[6..].to_vec()).unwrap().replace(",\"x\":true", "");
        assert_eq!(old.len(), frame.len() - 6 - 9);
        assert!(!serde_json::from_str::<CatalogFacts>(&old).unwrap().copy_follows);
        assert!(lean.encode().len() < frame.len());
        let mut newer = frame.to_vec();
        newer[1] = 9;
        assert!(CatalogFacts::decode(&newer).unwrap_err().message().contains("upgrade"));
    }

    #[test]
    fn added_columns_get_their_missing_value_or_a_reason_to_copy_again() {
        let column = |name: &str, missing: Option<Option<String>>, has_default: bool, by_then: bool| RemoteColumn {
            name: name.into(),
            attnum: 2,
            type_oid: 20,
            typmod: -1,
            type_name: "bigint".into(),
            missing,
            has_default,
            by_then,
        };
        let facts = CatalogFacts {
            relation: 1,
            older: false,
            columns: vec![
                column("fixed", Some(Some("7".into())), true, true),
                column("later", Some(None), false, false),
                column("volatile", None, true, true),
                column("plain", None, false, true),
            ],
            type_names: vec![],
            indexes: None,
            user_types: vec![],
            enums: vec![],
            copy_follows: false,
        };
        let add = |name: &str| ColumnChange::Add { name: name.into(), type_name: "bigint".into(), fill: None };
        let mut changes = vec![add("fixed"), add("plain")];
        assert_eq!(facts.fill_adds(&mut changes), Ok(vec![]));
        assert_eq!(
            changes[0],
            ColumnChange::Add { name: "fixed".into(), type_name: "bigint".into(), fill: Some("7".into()) }
        );
        assert_eq!(changes[1], add("plain"));
        assert!(facts.fill_adds(&mut [add("later")]).unwrap_err().contains("changed again since"));
        assert!(facts.fill_adds(&mut [add("volatile")]).unwrap_err().contains("volatile default"));
        assert!(facts.fill_adds(&mut [add("gone")]).unwrap_err().contains("changed again since"));
    }
}
