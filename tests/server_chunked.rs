//! Results the server drives in chunks look to a client exactly as
//! PostgreSQL's: the same rows, command tags and errors (also an error in
//! the middle of a result), through the simple and the extended protocol,
//! compared side by side with a native PostgreSQL.

mod common;
#[allow(dead_code)]
mod support;

use futures_util::{StreamExt, TryStreamExt};
use pglite_cache::server::ServerConfig;
use support::pg::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

/// What a client saw of one statement: its rows (as text), the command tag's
/// count, and the SQLSTATE of an error.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    rows: Vec<Vec<Option<String>>>,
    count: Option<u64>,
    error: Option<String>,
}

async fn simple(client: &Client, sql: &str) -> Seen {
    let mut seen = Seen { rows: Vec::new(), count: None, error: None };
    match client.simple_query_raw(sql).await {
        Ok(stream) => {
            tokio::pin!(stream);
            while let Some(message) = stream.next().await {
                match message {
                    Ok(SimpleQueryMessage::Row(row)) => {
                        seen.rows.push((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect())
                    }
                    Ok(SimpleQueryMessage::CommandComplete(n)) => seen.count = Some(n),
                    Ok(_) => {}
                    Err(e) => {
                        seen.error = e.code().map(|c| c.code().to_owned());
                        break;
                    }
                }
            }
        }
        Err(e) => seen.error = e.code().map(|c| c.code().to_owned()),
    }
    seen
}

/// Through the extended protocol (every column must be text).
async fn extended(client: &Client, sql: &str) -> Seen {
    let mut seen = Seen { rows: Vec::new(), count: None, error: None };
    match client.query_raw(sql, std::iter::empty::<i32>()).await {
        Ok(stream) => {
            tokio::pin!(stream);
            loop {
                match stream.try_next().await {
                    Ok(Some(row)) => seen.rows.push((0..row.len()).map(|i| row.get(i)).collect()),
                    Ok(None) => break,
                    Err(e) => {
                        seen.error = e.code().map(|c| c.code().to_owned());
                        break;
                    }
                }
            }
            seen.count = stream.rows_affected();
        }
        Err(e) => seen.error = e.code().map(|c| c.code().to_owned()),
    }
    seen
}

const SETUP: &str = "DROP TABLE IF EXISTS chunked CASCADE; CREATE TABLE chunked (i int PRIMARY KEY, t text); \
     CREATE VIEW chunked_text AS SELECT i::text, t FROM chunked";

/// Statements whose results span many chunks, or end in an error mid-way.
const STATEMENTS: &[&str] = &[
    "SELECT i::text, md5(i::text) FROM generate_series(1, 30000) AS i",
    "SELECT i::text, repeat('y', 3000) FROM generate_series(1, 3000) AS i;",
    "SELECT (i / (i - 25000))::text FROM generate_series(1, 30000) AS i",
    "INSERT INTO chunked SELECT i, md5(i::text) FROM generate_series(1, 20000) AS i RETURNING i::text, t",
    "WITH moved AS (UPDATE chunked SET t = 'z' || t WHERE i % 2 = 0 RETURNING i, t) SELECT i::text, t FROM moved",
    "TABLE chunked_text",
    "VALUES ('a'), ('b')",
    "SELECT 'none' WHERE false",
    "DELETE FROM chunked WHERE i > 5000 RETURNING i::text",
    "SELECT * FROM no_such_table",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_results_look_like_postgres() {
    let server = common::TestServer::start(ServerConfig::default()).await;
    let pg = PgCluster::start();
    let mut ours = server.connect().await;
    let mut theirs = pg.client("postgres").await;
    for (name, run) in [("simple", 0), ("extended", 1)] {
        ours.batch_execute(SETUP).await.unwrap();
        theirs.batch_execute(SETUP).await.unwrap();
        for sql in STATEMENTS {
            let (a, b) = if run == 0 {
                (simple(&ours, sql).await, simple(&theirs, sql).await)
            } else {
                (extended(&ours, sql).await, extended(&theirs, sql).await)
            };
            assert!(
                a == b,
                "{name} `{sql}`: ours {} rows, count {:?}, error {:?}; PostgreSQL {} rows, count {:?}, error {:?}",
                a.rows.len(),
                a.count,
                a.error,
                b.rows.len(),
                b.count,
                b.error
            );
        }
    }
    // A cursor fetched in steps, and a portal the client itself runs with a
    // row limit larger than a chunk, inside a transaction.
    for client in [&ours, &theirs] {
        client
            .batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT i::text FROM generate_series(1, 9000) AS i")
            .await
            .unwrap();
    }
    for sql in ["FETCH 4000 FROM c", "FETCH 4000 FROM c", "FETCH ALL FROM c"] {
        assert_eq!(extended(&ours, sql).await, extended(&theirs, sql).await, "{sql}");
    }
    assert_eq!(simple(&ours, "MOVE ABSOLUTE 0 IN c").await, simple(&theirs, "MOVE ABSOLUTE 0 IN c").await);
    assert_eq!(simple(&ours, "FETCH 5000 FROM c").await, simple(&theirs, "FETCH 5000 FROM c").await);
    for client in [&ours, &theirs] {
        client.batch_execute("COMMIT").await.unwrap();
    }
    let mut steps = Vec::new();
    for client in [&mut ours, &mut theirs] {
        let mut client_steps = Vec::new();
        let tx = client.transaction().await.unwrap();
        let statement = tx.prepare("SELECT i::text FROM generate_series(1, 7000) AS i").await.unwrap();
        let portal = tx.bind(&statement, &[]).await.unwrap();
        for _ in 0..3 {
            let rows = tx.query_portal(&portal, 3000).await.unwrap();
            client_steps.push(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>());
        }
        tx.commit().await.unwrap();
        steps.push(client_steps);
    }
    assert_eq!(steps[0].iter().map(Vec::len).collect::<Vec<_>>(), [3000, 3000, 1000]);
    assert_eq!(steps[0], steps[1]);
    // Pipelined: several chunked results (and an error between them) in one
    // batch of the client.
    let mut pipelined = Vec::new();
    for client in [&ours, &theirs] {
        let (a, b, c, d) = tokio::join!(
            extended(client, "SELECT i::text FROM generate_series(1, 6000) AS i"),
            extended(client, "SELECT (1 / (i - 3000))::text FROM generate_series(1, 6000) AS i"),
            extended(client, "SELECT repeat('p', 2000) FROM generate_series(1, 4000)"),
            extended(client, "VALUES ('last')"),
        );
        pipelined.push((a, b, c, d));
    }
    assert!(pipelined[0] == pipelined[1], "pipelined results differ from PostgreSQL's");
    assert_eq!(pipelined[0].2.rows.len(), 4000);
}

/// The bytes of a `COPY ... TO STDOUT` (through the extended protocol, as
/// tokio-postgres sends it) and the SQLSTATE of an error.
async fn copy_out(client: &Client, sql: &str) -> (Vec<u8>, Option<String>) {
    let mut data = Vec::new();
    match client.copy_out(sql).await {
        Ok(stream) => {
            tokio::pin!(stream);
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(e) => return (data, e.code().map(|c| c.code().to_owned())),
                }
            }
            (data, None)
        }
        Err(e) => (data, e.code().map(|c| c.code().to_owned())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_copy_to_stdout_looks_like_postgres() {
    let server = common::TestServer::start(ServerConfig::default()).await;
    let pg = PgCluster::start();
    let ours = server.connect().await;
    let theirs = pg.client("postgres").await;
    let setup = "CREATE TABLE copied (i int, t text, n numeric, g int GENERATED ALWAYS AS (i * 2) STORED, b bytea); \
         INSERT INTO copied (i, t, n, b) SELECT i, CASE WHEN i % 7 = 0 THEN NULL WHEN i % 5 = 0 THEN '' \
         ELSE 'a,\"b\"' || E'\\t\\n\\\\' || i END, i / 3.0, '\\x00ff' FROM generate_series(1, 20000) AS i; \
         CREATE VIEW copied_view AS SELECT i FROM copied";
    ours.batch_execute(setup).await.unwrap();
    theirs.batch_execute(setup).await.unwrap();
    for sql in [
        "COPY copied TO STDOUT",
        "COPY copied (t, i) TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY public.copied TO STDOUT (FORMAT binary)",
        "COPY (SELECT * FROM copied ORDER BY i DESC) TO STDOUT WITH CSV",
        "COPY (SELECT i, t FROM copied) TO STDOUT (FORMAT text, HEADER true)",
        "COPY (SELECT 1 / (i - 15000) FROM copied) TO STDOUT",
        "COPY (SELECT nothing FROM copied) TO STDOUT",
        "COPY copied (nothing) TO STDOUT",
        "COPY copied (g) TO STDOUT",
        "COPY copied_view TO STDOUT",
        "COPY no_such_table TO STDOUT",
    ] {
        let (a, b) = (copy_out(&ours, sql).await, copy_out(&theirs, sql).await);
        assert!(a.1 == b.1, "`{sql}`: error {:?} here, {:?} in PostgreSQL", a.1, b.1);
        if a.1.is_none() {
            assert!(a.0 == b.0, "`{sql}`: {} bytes here, {} in PostgreSQL", a.0.len(), b.0.len());
        }
    }
    // psql and pg_dump send COPY as a simple query.
    for sql in ["COPY copied TO STDOUT", "COPY (SELECT 1 / (i - 15000) FROM copied) TO STDOUT"] {
        let (a, b) = (simple(&ours, sql).await, simple(&theirs, sql).await);
        assert_eq!(a, b, "{sql}");
    }
}
