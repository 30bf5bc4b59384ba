//! The publisher's reading of the remote catalog, so that schema changes
//! travel in the stream: when the walsender sends a Relation message, the
//! publisher reads the catalog facts a slot-fed apply would read
//! ([`CatalogFacts::read`], same query, same "is the catalog current for
//! this message" check against the message's transaction) and the
//! [`super::record::Chunker`] puts them next to every copy of the message.
//!
//! `ALTER TYPE ... ADD VALUE` sends no message: the publisher looks at the
//! enum values of the changes of tables with enum columns, and when one
//! has a label the facts do not list, reads the labels again and sends the
//! facts once more before that change.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::replication::apply::facts::{self, CatalogFacts};
use crate::replication::config::SourceConfig;
use crate::replication::error::ReplicationError;
use crate::replication::pgoutput::{self, LogicalMessage, Value};
use crate::replication::remote_client;

/// A table's facts frames: (table, full, lean) for [`super::record::Chunker::set_facts`].
pub(super) type Frames = (u32, Bytes, Bytes);

/// Per publisher session.
pub(super) struct CatalogReader {
    source: SourceConfig,
    client: Option<tokio_postgres::Client>,
    /// The transaction being received (Begin's xid).
    xid: u32,
    /// Facts about each table's latest Relation message.
    facts: HashMap<u32, CatalogFacts>,
    /// The type OID of each column of each table's latest Relation message.
    types: HashMap<u32, Vec<u32>>,
    /// Labels already looked up (a label renamed since is not found, and
    /// is not looked up for every change).
    looked_up: HashSet<(u32, Bytes)>,
}

impl CatalogReader {
    pub(super) fn new(source: SourceConfig) -> CatalogReader {
        CatalogReader {
            source,
            client: None,
            xid: 0,
            facts: HashMap::new(),
            types: HashMap::new(),
            looked_up: HashSet::new(),
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, ReplicationError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(remote_client(&self.source).await?);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// Notes a Begin message's xid.
    pub(super) fn begin(&mut self, data: &[u8]) {
        if let Some(xid) = data.get(17..21).and_then(|b| b.try_into().ok()) {
            self.xid = u32::from_be_bytes(xid);
        }
    }

    /// The facts frame about a Relation message just received.
    pub(super) async fn relation(&mut self, data: &Bytes) -> Result<Frames, ReplicationError> {
        let LogicalMessage::Relation(rel) = decode(data)? else {
            return Err(ReplicationError::fatal("not a Relation message"));
        };
        let xid = self.xid;
        let facts = CatalogFacts::read(self.client().await?, &rel, xid).await?;
        let (full, lean) = (facts.encode(), facts.lean().encode());
        tracing::debug!(
            relation = rel.id,
            xid,
            bytes = full.len(),
            lean = lean.len(),
            older = facts.older,
            "catalog facts read"
        );
        self.facts.insert(rel.id, facts);
        self.types.insert(rel.id, rel.columns.iter().map(|c| c.type_oid).collect());
        Ok((rel.id, full, lean))
    }

    /// For a change (Insert or Update) whose new row has an enum label the
    /// facts do not list: the labels read again, and the facts frames of
    /// every table using that enum, to go into the stream before the change.
    pub(super) async fn labels_for_change(&mut self, data: &Bytes) -> Result<Vec<Frames>, ReplicationError> {
        let relation = match data.first() {
            Some(b'I' | b'U') => u32::from_be_bytes(data[1..5].try_into().map_err(|_| short())?),
            _ => return Ok(Vec::new()),
        };
        let Some(f) = self.facts.get(&relation).filter(|f| !f.enums.is_empty()) else {
            return Ok(Vec::new());
        };
        let new = match decode(data)? {
            LogicalMessage::Insert { new, .. } | LogicalMessage::Update { new, .. } => new,
            _ => return Ok(Vec::new()),
        };
        // Which column has which enum: the message's types, by position.
        let Some(types) = self.types.get(&relation) else { return Ok(Vec::new()) };
        let mut stale = Vec::new();
        for (value, oid) in new.iter().zip(types) {
            let (Value::Text(label), Some(labels)) = (value, f.labels(*oid)) else { continue };
            if !labels.iter().any(|l| l.as_bytes() == label.as_ref())
                && !stale.contains(oid)
                && self.looked_up.insert((*oid, label.clone()))
            {
                stale.push(*oid);
            }
        }
        let mut frames = Vec::new();
        for oid in stale {
            let labels = facts::read_labels(self.client().await?, oid).await?;
            tracing::info!(enum_oid = oid, ?labels, "enum labels added upstream; sending them");
            for (id, f) in self.facts.iter_mut() {
                if let Some(e) = f.enums.iter_mut().find(|e| e.oid == oid) {
                    e.labels = labels.clone();
                    frames.push((*id, f.encode(), f.lean().encode()));
                }
            }
        }
        Ok(frames)
    }
}

fn decode(data: &Bytes) -> Result<LogicalMessage, ReplicationError> {
    pgoutput::decode(data, false).map_err(|e| ReplicationError::fatal(e.to_string()))
}

fn short() -> ReplicationError {
    ReplicationError::fatal("short pgoutput message")
}
