//! One client connection after startup: frontend messages in, engine replies out.
//!
//! Messages are collected into a batch and sent to the connection's
//! [`RawSession`] at client-visible boundaries (`Sync`, `Query`, `Flush`),
//! taking every complete message already received, so a pipelining client
//! costs one engine round trip per read rather than per statement. The
//! session's lease keeps the engine for this connection while it is busy (in a
//! transaction, in an extended-protocol batch not yet synced), so nothing of
//! another client interleaves.
//!
//! `COPY ... FROM STDIN` needs care: the engine must receive the statement,
//! all its data and the `CopyDone` in one call (it cannot wait for more input
//! mid-call; running out of input inside a COPY kills it): see `copy_in.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::backend;
use super::config::ServerConfig;
use super::frame::{Frame, FrameError, FrameReader};
use super::names::{Malformed, Named, Namer};
use super::notify::{self, Hub};
use super::settings::SessionSettings;
use super::sql_text::{self, Listening, SqlName};
use crate::{Error, RawSession};
use chunks::Cut;
use copy_in::{CopyIn, CopyKind};

mod batch;
mod chunks;
mod cleanup;
mod copy_in;
mod copy_out;
mod copy_out_run;
mod lazy_begin;
mod waiting;

/// What `DEALLOCATE ALL`/`DISCARD ALL` sent with `Parse` become.
const REFUSED_RESET: &str = "DO $pglite_cache$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
     MESSAGE = 'DEALLOCATE ALL and DISCARD ALL are only supported as a simple query on this server', \
     HINT = 'Many clients share one backend here; the simple-query form applies to this connection only.'; \
     END$pglite_cache$";

/// A batch larger than this is sent without waiting for its `Sync` (the
/// session's lease keeps it together).
const SPILL_BYTES: usize = 1 << 20;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Malformed(#[from] Malformed),
    #[error("engine: {0}")]
    Engine(#[from] Error),
    #[error("the client took none of its reply for {0:?}")]
    WriteTimeout(std::time::Duration),
}

type Result<T, E = ConnectionError> = std::result::Result<T, E>;

/// Messages of the current batch, already rewritten for the engine.
#[derive(Debug, Default)]
struct Batch {
    bytes: BytesMut,
    /// Ends at a `Sync`, `Query` or `Flush`: the client waits for an answer.
    boundary: bool,
    /// Some statement in it may change session settings.
    may_change_settings: bool,
    /// Where the current extended-protocol group (since the last `Sync`) starts.
    group_start: usize,
    /// The current group executes a portal that may be `COPY FROM STDIN`.
    copy_candidate: bool,
    /// Where the first such `Execute` ends in `bytes`.
    copy_execute_end: Option<usize>,
    /// `LISTEN`/`UNLISTEN` statements in it.
    listens: Vec<Listening>,
    /// SQL-level `PREPARE`/`DECLARE ... WITH HOLD` and their ends in it.
    sql_names: Vec<SqlName>,
    /// `Execute`s driven in chunks (see `chunks.rs`), in order.
    cuts: Vec<Cut>,
    /// A simple query sent as extended messages: the reply gets the simple shape.
    simple: bool,
    /// Its last `Bind` binds the unnamed portal, without parameters, to a
    /// statement that is a plain `BEGIN` (this tag): see `lazy_begin.rs`.
    begin_bind: Option<&'static str>,
}

/// What woke an idle connection.
enum Event {
    Shutdown,
    EngineRestarted,
    IdleInTransaction,
    Notification(Bytes),
    Read(usize),
}

/// What to do after a message.
enum Flow {
    Continue,
    Close,
}

/// One client connection.
pub(crate) struct Connection<S> {
    id: u32,
    stream: S,
    reader: FrameReader,
    session: RawSession,
    namer: Namer,
    config: Arc<ServerConfig>,
    settings: SessionSettings,
    /// Client names of statements (and portals bound from them) whose SQL
    /// mentions `stdin`.
    stdin_statements: HashSet<Vec<u8>>,
    stdin_portals: HashSet<Vec<u8>>,
    /// Client names of statements (and portals bound from them) known to
    /// return no rows (their `Execute` is not chunked).
    quiet_statements: HashSet<Vec<u8>>,
    quiet_portals: HashSet<Vec<u8>>,
    /// Client names of statements that are a plain `BEGIN`, and its tag.
    begin_statements: std::collections::HashMap<Vec<u8>, &'static str>,
    /// Statements (and portals bound from them) that are a `COPY ... TO
    /// STDOUT` the server runs in chunks.
    copy_statements: std::collections::HashMap<Vec<u8>, copy_out::CopyTo>,
    copy_portals: std::collections::HashMap<Vec<u8>, copy_out::CopyTo>,
    /// SQL-level prepared statements and `WITH HOLD` cursors it created
    /// (closed when it leaves).
    sql_statements: HashSet<String>,
    sql_cursors: HashSet<String>,
    /// The last `ReadyForQuery` status the client saw.
    status: u8,
    copy: Option<CopyIn>,
    hub: Arc<Hub>,
    /// Notifications for this connection from other connections' batches.
    notify_tx: mpsc::UnboundedSender<Bytes>,
    notify_rx: mpsc::UnboundedReceiver<Bytes>,
    /// Signalled by a matching `CancelRequest`.
    cancel: Arc<Notify>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(
        stream: S,
        id: u32,
        session: RawSession,
        settings: SessionSettings,
        config: Arc<ServerConfig>,
        hub: Arc<Hub>,
        cancel: Arc<Notify>,
    ) -> Self {
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        Connection {
            id,
            stream,
            reader: FrameReader::new(config.max_message_size),
            session,
            namer: Namer::new(id),
            config,
            settings,
            stdin_statements: HashSet::new(),
            stdin_portals: HashSet::new(),
            quiet_statements: HashSet::new(),
            quiet_portals: HashSet::new(),
            begin_statements: Default::default(),
            copy_statements: Default::default(),
            copy_portals: Default::default(),
            sql_statements: HashSet::new(),
            sql_cursors: HashSet::new(),
            status: b'I',
            copy: None,
            hub,
            notify_tx,
            notify_rx,
            cancel,
        }
    }

    /// Serves the client until it leaves, breaks the protocol, or the server
    /// shuts down while this connection is idle. Dropping the connection
    /// (also when its task is aborted) drops the session, which rolls back
    /// an open transaction.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let outcome = self.serve(&mut shutdown).await;
        let fatal = match &outcome {
            Ok(()) => None,
            Err(ConnectionError::Io(e)) => {
                tracing::debug!(error = %e, "client connection lost");
                None
            }
            Err(e @ ConnectionError::WriteTimeout(_)) => {
                tracing::info!(error = %e, "closing connection");
                return; // it does not read: no goodbye (dropping rolls back)
            }
            Err(e @ (ConnectionError::Frame(_) | ConnectionError::Malformed(_))) => {
                tracing::info!(error = %e, "closing connection");
                Some(("08P01", e.to_string()))
            }
            Err(ConnectionError::Engine(e)) => {
                tracing::warn!(error = %e, "closing connection");
                // A database error here comes from the client's startup
                // settings (e.g. an invalid TimeZone): keep its SQLSTATE.
                let code = e.code().map_or("XX000", |c| c.code());
                Some((code, e.as_db_error().map_or_else(|| e.to_string(), |db| db.message.clone())))
            }
        };
        if let Some((code, text)) = fatal {
            let mut out = BytesMut::new();
            backend::error_response("FATAL", code, &text, &mut out);
            let _ = self.write_out(&out).await;
        }
        let _ = self.stream.shutdown().await;
    }

    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        if self.settings.needs_hold(false) {
            // Startup settings are checked (and saved) right away, as
            // PostgreSQL refuses bad ones at connect time.
            self.session.hold().await?;
            self.settings.apply(&mut self.session).await?;
            self.after_busy().await?;
        }
        let mut batch = Batch::default();
        loop {
            while let Some(frame) = self.reader.next_buffered()? {
                if let Flow::Close = self.on_frame(frame, &mut batch).await? {
                    return Ok(());
                }
            }
            if batch.boundary || (batch.bytes.len() > SPILL_BYTES && !batch.copy_candidate) {
                self.send_batch(&mut batch).await?;
            }
            let idle = batch.bytes.is_empty() && self.copy.is_none() && !self.session.holds_engine();
            // At shutdown, a client that the server waits for is closed at
            // once, also inside a transaction (rolled back, as PostgreSQL's
            // fast shutdown does); only a COPY upload gets the grace period.
            let closable = self.copy.is_none() || !self.session.holds_engine();
            let stopping = *shutdown.borrow();
            if closable && stopping {
                return self.say_goodbye().await;
            }
            // Notifications wait until the client is idle outside a transaction.
            let deliver = idle && self.status == b'I';
            // Holding the engine while the client is silent stalls everybody.
            let idle_limit = self.config.idle_in_transaction_timeout.filter(|_| self.session.holds_engine());
            let idle_timer = async move {
                match idle_limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop), if closable => Event::Shutdown,
                () = self.session.engine_restarted() => Event::EngineRestarted,
                () = idle_timer => Event::IdleInTransaction,
                Some(message) = self.notify_rx.recv(), if deliver => Event::Notification(message),
                read = self.reader.fill(&mut self.stream) => Event::Read(read?),
            };
            match event {
                Event::Shutdown => return self.say_goodbye().await,
                // Told at once, as PostgreSQL tells every session when a
                // backend crashes: a pool drops the connection before using it.
                Event::EngineRestarted => return Err(crate::Error::engine_restarted().into()),
                Event::IdleInTransaction => {
                    tracing::info!(id = self.id, "closing a connection idle in a transaction");
                    let mut out = BytesMut::new();
                    backend::error_response(
                        "FATAL",
                        "25P03",
                        "terminating connection due to idle-in-transaction timeout",
                        &mut out,
                    );
                    let _ = self.write_out(&out).await;
                    return Ok(());
                }
                Event::Notification(message) => {
                    self.write_out(&message).await?;
                }
                Event::Read(0) => return Ok(()), // the client left
                Event::Read(_) => {}
            }
        }
    }

    async fn say_goodbye(&mut self) -> Result<()> {
        let mut out = BytesMut::new();
        backend::error_response("FATAL", "57P01", "terminating connection due to administrator command", &mut out);
        self.write_out(&out).await
    }

    /// Writes to the client and flushes; with a write timeout, a client that
    /// takes no bytes for that long ends the connection.
    pub(super) async fn write_out(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(limit) = self.config.write_timeout else {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await?;
            return Ok(());
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            let written = tokio::time::timeout(limit, self.stream.write(rest))
                .await
                .map_err(|_| ConnectionError::WriteTimeout(limit))??;
            if written == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            rest = &rest[written..];
        }
        tokio::time::timeout(limit, self.stream.flush()).await.map_err(|_| ConnectionError::WriteTimeout(limit))??;
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame, batch: &mut Batch) -> Result<Flow> {
        if self.copy.is_some() {
            return self.on_copy_frame(frame, batch).await;
        }
        match frame.tag {
            b'X' => return Ok(Flow::Close),
            // Outside COPY these are ignored, as PostgreSQL does.
            b'd' | b'c' | b'f' => {}
            b'Q' => {
                let sql = frame.body().strip_suffix(b"\0").ok_or(Malformed("Query"))?;
                if self.simple_begin(sql, batch).await? {
                    return Ok(Flow::Continue);
                }
                if sql_text::is_exactly(sql, &["deallocate", "all"]) {
                    self.send_batch(batch).await?;
                    return self.deallocate_all(false).await.map(|()| Flow::Continue);
                }
                if sql_text::is_exactly(sql, &["discard", "all"]) && self.status == b'I' {
                    self.send_batch(batch).await?;
                    return self.deallocate_all(true).await.map(|()| Flow::Continue);
                }
                if sql_text::has_statement(sql, &["deallocate", "all"])
                    || sql_text::has_statement(sql, &["discard", "all"])
                {
                    // Inside a longer script they would hit every client.
                    self.send_batch(batch).await?;
                    let mut reply = BytesMut::new();
                    backend::error_response(
                        "ERROR",
                        "0A000",
                        "DEALLOCATE ALL and DISCARD ALL are only supported as a query of their own on this server",
                        &mut reply,
                    );
                    backend::ready_for_query(self.status, &mut reply);
                    self.forward(&reply).await?;
                    return Ok(Flow::Continue);
                }
                if sql_text::mentions_stdin(sql) {
                    self.send_batch(batch).await?;
                    self.start_copy(frame.bytes, CopyKind::Simple).await?;
                    return Ok(Flow::Continue);
                }
                if let Some(copy) = copy_out::parse(sql) {
                    self.send_batch(batch).await?;
                    if self.copy_out(copy, true).await? {
                        return Ok(Flow::Continue);
                    }
                }
                if let Some((bytes, cut)) = chunks::simple_as_extended(sql) {
                    // One row-returning statement: chunked, in a batch of its own.
                    self.send_batch(batch).await?;
                    let may_change_settings = sql_text::may_change_settings(sql);
                    let mut single = Batch {
                        bytes,
                        boundary: true,
                        may_change_settings,
                        cuts: vec![cut],
                        simple: true,
                        ..Batch::default()
                    };
                    self.send_batch(&mut single).await?;
                    return Ok(Flow::Continue);
                }
                batch.may_change_settings |= sql_text::may_change_settings(sql);
                batch.listens.extend(sql_text::listen_commands(sql));
                batch.sql_names.extend(sql_text::sql_names(sql));
                batch.bytes.extend_from_slice(&frame.bytes);
                batch.boundary = true;
                batch.group_start = batch.bytes.len();
            }
            b'S' | b'H' => {
                batch.bytes.extend_from_slice(&frame.bytes);
                batch.boundary = true;
                if batch.copy_candidate {
                    // The group runs as it is (its limits untouched).
                    batch.cuts.retain(|cut| cut.end <= batch.group_start);
                    let group = batch.bytes.split_off(batch.group_start);
                    let execute_end = batch.copy_execute_end.take().map_or(group.len(), |end| end - batch.group_start);
                    batch.copy_candidate = false;
                    self.send_batch(batch).await?;
                    // During COPY IN only data, Sync and Flush may follow; any
                    // other message would make the engine exit (PostgreSQL
                    // fails the COPY instead, which is done here).
                    let intruder =
                        backend::messages(&group[execute_end..]).map(|(t, _)| t).find(|t| !matches!(t, b'S' | b'H'));
                    match intruder {
                        None => self.start_copy(group, CopyKind::Extended).await?,
                        Some(tag) => {
                            let mut bytes = BytesMut::from(&group[..execute_end]);
                            backend::copy_fail(
                                &format!("unexpected message type 0x{tag:02X} during COPY from stdin"),
                                &mut bytes,
                            );
                            bytes.extend_from_slice(&group[execute_end..]);
                            let mut batch = Batch { bytes, boundary: true, ..Batch::default() };
                            self.send_batch(&mut batch).await?;
                        }
                    }
                } else if frame.tag == b'S' {
                    batch.group_start = batch.bytes.len();
                }
            }
            b'P' | b'B' | b'E' | b'D' | b'C' => {
                let mut named = Named::parse(&frame)?.ok_or(Malformed("extended query"))?;
                if let Named::Parse { sql, .. } = &mut named
                    && (sql_text::is_exactly(sql, &["deallocate", "all"])
                        || sql_text::is_exactly(sql, &["discard", "all"]))
                {
                    // Through Parse these would drop every client's statements
                    // on the shared backend; only the simple-query form is
                    // handled per client. Make it fail instead, clearly.
                    *sql = REFUSED_RESET.as_bytes();
                }
                self.track(frame.tag, &named, batch);
                if let Named::Execute { portal, .. } = named
                    && let Some(copy) = self.copy_portals.get(portal).cloned()
                {
                    // What comes before runs first (the engine is held mid-batch).
                    self.send_batch(batch).await?;
                    if self.copy_out(copy, false).await? {
                        return Ok(Flow::Continue);
                    }
                }
                self.namer.rewrite(frame.tag, &named, &mut batch.bytes);
                if let Named::Execute { portal, .. } = named
                    && !self.stdin_portals.contains(portal)
                    && !self.quiet_portals.contains(portal)
                    && let Some(cut) = Cut::at_end_of(&batch.bytes)
                {
                    batch.cuts.push(cut);
                }
                if batch.copy_candidate && batch.copy_execute_end.is_none() && frame.tag == b'E' {
                    batch.copy_execute_end = Some(batch.bytes.len());
                }
            }
            _ => batch.bytes.extend_from_slice(&frame.bytes), // FunctionCall
        }
        Ok(Flow::Continue)
    }

    /// Bookkeeping for statement names, COPY candidates and settings.
    fn track(&mut self, tag: u8, named: &Named<'_>, batch: &mut Batch) {
        match *named {
            Named::Parse { statement, sql, .. } => {
                if sql_text::mentions_stdin(sql) {
                    self.stdin_statements.insert(statement.to_vec());
                } else {
                    self.stdin_statements.remove(statement);
                }
                match copy_out::parse(sql) {
                    Some(copy) => self.copy_statements.insert(statement.to_vec(), copy),
                    None => self.copy_statements.remove(statement),
                };
                if chunks::may_return_rows(sql) {
                    self.quiet_statements.remove(statement);
                } else {
                    self.quiet_statements.insert(statement.to_vec());
                }
                match sql_text::plain_begin(sql) {
                    Some(tag) => self.begin_statements.insert(statement.to_vec(), tag),
                    None => self.begin_statements.remove(statement),
                };
                batch.may_change_settings |= sql_text::may_change_settings(sql);
                batch.listens.extend(sql_text::listen_commands(sql));
                batch.sql_names.extend(sql_text::sql_names(sql));
            }
            Named::Bind { portal, statement, rest } => {
                batch.begin_bind = match self.begin_statements.get(statement) {
                    Some(&tag) if portal.is_empty() && lazy_begin::bind_parameters(rest) == Some(0) => Some(tag),
                    _ => None,
                };
                if self.stdin_statements.contains(statement) {
                    self.stdin_portals.insert(portal.to_vec());
                } else {
                    self.stdin_portals.remove(portal);
                }
                match self.copy_statements.get(statement) {
                    Some(copy) => self.copy_portals.insert(portal.to_vec(), copy.clone()),
                    None => self.copy_portals.remove(portal),
                };
                if self.quiet_statements.contains(statement) {
                    self.quiet_portals.insert(portal.to_vec());
                } else {
                    self.quiet_portals.remove(portal);
                }
            }
            Named::Execute { portal, .. } => {
                if self.stdin_portals.contains(portal) {
                    batch.copy_candidate = true;
                }
            }
            Named::Target { kind: b'S', name } if tag == b'C' => {
                self.stdin_statements.remove(name);
                self.quiet_statements.remove(name);
                self.copy_statements.remove(name);
                self.begin_statements.remove(name);
            }
            Named::Target { .. } => {}
        }
    }

    /// Records this connection's `UNLISTEN`s, and keeps the engine listening
    /// on the channels other connections still want.
    async fn unlisten(&mut self, listens: &[Listening]) -> Result<()> {
        let mut unlistened = false;
        for listen in listens {
            match listen {
                Listening::Listen(_) => {}
                Listening::Unlisten(channel) => {
                    self.hub.unlisten(channel, self.id);
                    unlistened = true;
                }
                Listening::UnlistenAll => {
                    self.hub.unlisten_all(self.id);
                    unlistened = true;
                }
            }
        }
        let wanted = self.hub.channels();
        if unlistened && !wanted.is_empty() {
            let sql: Vec<String> = wanted.iter().map(|c| format!("LISTEN {}", sql_text::quote_identifier(c))).collect();
            self.internal(&sql.join("; ")).await?;
        }
        Ok(())
    }

    /// Before a round trip: if the connection has (or may create) session
    /// settings, take the engine and put them in force.
    /// Waits at most `limit` for the engine; false if the limit passed first.
    async fn begin_busy(&mut self, may_change_settings: bool, limit: Option<std::time::Duration>) -> Result<bool> {
        // Others' Parse may run in this client's transaction only while no
        // settings of its own (search_path...) are in force.
        self.session.set_shareable(!self.settings.needs_hold(may_change_settings));
        if self.settings.needs_hold(may_change_settings) {
            if !self.hold_within(limit).await? {
                return Ok(false);
            }
            self.settings.apply(&mut self.session).await?;
        }
        Ok(true)
    }

    /// After a round trip: once the engine is idle, save this connection's
    /// settings, restore the defaults and let the others in.
    async fn after_busy(&mut self) -> Result<()> {
        if !self.session.is_idle() {
            return Ok(());
        }
        if self.settings.applied() {
            self.settings.capture_and_reset(&mut self.session).await?;
        }
        self.session.release();
        Ok(())
    }

    /// Runs server-side statements (savepoints, cleanup) on the engine; the
    /// reply is not for the client.
    async fn internal(&mut self, sql: &str) -> Result<()> {
        let mut bytes = BytesMut::new();
        backend::query(sql, &mut bytes);
        let reply = self.session.round_trip(bytes).await?;
        if let Err(e) = crate::protocol::decode(&reply).and_then(|r| r.into_results()) {
            tracing::debug!(%sql, error = %e, "internal statement failed");
        }
        Ok(())
    }

    /// Writes engine output to the client and notes the transaction status.
    /// Notifications in it go to the connections that listen on their
    /// channel (this one included).
    async fn forward(&mut self, reply: &[u8]) -> Result<()> {
        if let Some(status) = backend::last_ready_status(reply) {
            self.status = status;
        }
        if backend::messages(reply).any(|(tag, _)| tag == b'A') {
            let mut kept = BytesMut::with_capacity(reply.len());
            for (tag, message) in backend::messages(reply) {
                let mine =
                    tag != b'A' || notify::channel_of(message).is_some_and(|c| self.hub.dispatch(c, message, self.id));
                if mine {
                    kept.extend_from_slice(message);
                }
            }
            self.write_out(&kept).await
        } else {
            self.write_out(reply).await
        }
    }

    /// `DEALLOCATE ALL` / `DISCARD ALL` as a client expects them: only its
    /// own statements (and, for DISCARD, its own settings) go; the other
    /// clients' statements on the shared backend stay.
    async fn deallocate_all(&mut self, discard: bool) -> Result<()> {
        let mut bytes = BytesMut::new();
        self.close_own(discard, &mut bytes);
        if discard {
            self.settings.clear(); // DISCARD ALL runs only outside transactions: nothing is applied now
        }
        self.begin_busy(false, None).await?;
        let reply = self.session.round_trip(bytes).await?;
        let status = backend::last_ready_status(&reply).unwrap_or(self.status);
        self.after_busy().await?;
        let mut out = BytesMut::new();
        backend::command_complete(if discard { "DISCARD ALL" } else { "DEALLOCATE ALL" }, &mut out);
        backend::ready_for_query(status, &mut out);
        self.forward(&out).await
    }
}
