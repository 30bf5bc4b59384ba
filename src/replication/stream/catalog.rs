//! The publisher's reading of the remote catalog, so that schema changes
//! travel in the stream: when the walsender sends a Relation message, the
//! publisher reads the catalog facts a slot-fed apply would read
//! ([`CatalogFacts::read`], same query, same "is the catalog current for
//! this message" check against the message's transaction) and the
//! [`super::record::Chunker`] puts them next to every copy of the message.
//!
//! A change a cache cannot follow in place (see `apply::relation::recopy`)
//! is decided here too, with the same code, from the previous Relation
//! message of the table in this session: the facts then say that a copy
//! of the table follows, and the publisher puts one in the stream
//! (`table_copy`). The first message of a table in a session is compared
//! with nothing: a cache that finds it needs a copy halts.
//!
//! `ALTER TYPE ... ADD VALUE` sends no message: the publisher looks at the
//! enum values of the changes of tables with enum columns, and when one
//! has a label the facts do not list, reads the labels again and sends the
//! facts once more before that change.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::replication::apply::columns::{self, ColumnChange, NewColumn};
use crate::replication::apply::facts::{self, CONVERTS_IN_PLACE_SQL, CatalogFacts};
use crate::replication::apply::relation::retype_reason;
use crate::replication::config::SourceConfig;
use crate::replication::error::ReplicationError;
use crate::replication::pgoutput::{self, LogicalMessage, Value};
use crate::replication::remote_client;
use crate::replication::statements::LocalColumn;

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
    /// Each table's columns as a cache's apply sees them after the table's
    /// latest Relation message of this session.
    views: HashMap<u32, Vec<LocalColumn>>,
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
            views: HashMap::new(),
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

    /// The facts frames about a Relation message just received, and why
    /// the caches need a new copy of the table, if they do and `may_copy`,
    /// or if its copy is `pending` anyway (then the facts say that one
    /// follows, and the caller sees to it).
    pub(super) async fn relation(
        &mut self,
        data: &Bytes,
        may_copy: bool,
        pending: bool,
    ) -> Result<(Frames, Option<String>), ReplicationError> {
        let LogicalMessage::Relation(rel) = decode(data)? else {
            return Err(ReplicationError::fatal("not a Relation message"));
        };
        let xid = self.xid;
        let mut facts = CatalogFacts::read(self.client().await?, &rel, xid).await?;
        let (view, copy) = self.decide(rel.id, &facts.new_columns(&rel), &facts).await?;
        self.views.insert(rel.id, view);
        let copy = match copy {
            Some(reason) if may_copy => Some(reason),
            // E.g. a transaction cut off by a restart of the publisher, sent
            // again: its message is the first of the session, and was marked.
            _ if pending => Some("the table's copy is pending".to_owned()),
            _ => None,
        };
        facts.copy_follows = copy.is_some();
        let (full, lean) = (facts.encode(), facts.lean().encode());
        tracing::debug!(
            relation = rel.id,
            xid,
            bytes = full.len(),
            lean = lean.len(),
            older = facts.older,
            copy_follows = facts.copy_follows,
            "catalog facts read"
        );
        self.facts.insert(rel.id, facts);
        self.types.insert(rel.id, rel.columns.iter().map(|c| c.type_oid).collect());
        Ok(((rel.id, full, lean), copy))
    }

    /// The table's view after a message with columns `new`, and why a cache
    /// cannot follow it in place, if so: the checks of
    /// `apply::relation::follow`, from the view after the previous message.
    async fn decide(
        &mut self,
        id: u32,
        new: &[NewColumn],
        facts: &CatalogFacts,
    ) -> Result<(Vec<LocalColumn>, Option<String>), ReplicationError> {
        // After a copy, a cache reads its table's columns (attribute numbers unknown).
        let copied = || -> Vec<LocalColumn> {
            new.iter()
                .map(|c| LocalColumn { name: c.name.clone(), type_name: c.type_name.clone(), attnum: None })
                .collect()
        };
        let Some(old) = self.views.get(&id) else { return Ok((copied(), None)) };
        let (mut changes, view) = match columns::plan(old, new) {
            Ok(plan) => plan,
            Err(reason) => return Ok((copied(), Some(reason))),
        };
        if let Err(reason) = facts.fill_adds(&mut changes) {
            return Ok((copied(), Some(reason)));
        }
        for change in &changes {
            let ColumnChange::Retype { name, from_type, type_name } = change else { continue };
            let row = self.client().await?.query_one(CONVERTS_IN_PLACE_SQL, &[from_type, type_name]).await?;
            if !row.get::<_, Option<bool>>(0).unwrap_or(false) {
                return Ok((copied(), Some(retype_reason(name, from_type, type_name))));
            }
        }
        Ok((view, None))
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
