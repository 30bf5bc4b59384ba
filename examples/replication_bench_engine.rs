//! Engine cost of the apply's small local transactions, statement shape by
//! statement shape: CPU and wall time per transaction of the process, on a
//! persistent instance (as `pglite-cache sync` runs), through named prepared
//! statements (as the apply sends them) or unnamed ones.
//!
//! ```sh
//! cargo run --release --locked --example replication_bench_engine   # TXNS=3000 by default
//! TRIGGERS=1 cargo run --release --locked --example replication_bench_engine   # read-only trigger, sync commit
//! LSN_SHAPES=1 cargo run --release --locked --example replication_bench_engine # the stored-LSN update
//! BATCH_ROWS=400 cargo run --release --locked --example replication_bench_engine # unnest (text or typed arrays) vs one-row statements
//! ```
//!
//! With `BATCH_ROWS`, the shapes also include `COPY ... FROM STDIN` (text or
//! binary) inside the same round trip, its data right after the `Execute`,
//! for the inserts and for the updates (as a delete and a COPY), and binary
//! COPY for the inserts only: a shape the apply does not use yet (see
//! BENCHMARKS.md, round 11).

use std::time::Instant;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::IsNull;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use pglite_cache::{Instance, InstanceOptions};

const SETTINGS: &str = "SELECT set_config('session_replication_role', 'replica', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), \
     set_config('plan_cache_mode', 'force_generic_plan', true)";
/// Without `session_replication_role`: changing it resets every cached plan
/// of the session (PostgreSQL's assign hook calls `ResetPlanCache`).
const SETTINGS_FLAG: &str = "SELECT set_config('pglite_cache.applying', 'on', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), \
     set_config('plan_cache_mode', 'force_generic_plan', true)";
const LSN: &str = "UPDATE lsn SET applied_lsn = $1::pg_lsn, \
     applied_commit_time = timestamptz '2000-01-01 00:00:00+00' + $2::int8 * interval '1 microsecond', updated_at = now()";
const INSERT_UNNEST: &str = "INSERT INTO items (id, n, label, at, payload) SELECT u.c0::integer, u.c1::integer, u.c2::text, \
     u.c3::timestamptz, u.c4::text FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(c0, c1, c2, c3, c4)";
const UPDATE_UNNEST: &str = "UPDATE items AS t SET n = u.c1::integer, label = u.c2::text, at = u.c3::timestamptz, \
     payload = u.c4::text FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(c0, c1, c2, c3, c4) \
     WHERE t.id = u.c0::integer";
const INSERT_TYPED: &str = "INSERT INTO items (id, n, label, at, payload) SELECT u.c0, u.c1, u.c2, u.c3, u.c4 \
     FROM unnest($1::integer[], $2::integer[], $3::text[], $4::timestamptz[], $5::text[]) AS u(c0, c1, c2, c3, c4)";
const UPDATE_TYPED: &str = "UPDATE items AS t SET n = u.c1, label = u.c2, at = u.c3, payload = u.c4 \
     FROM unnest($1::integer[], $2::integer[], $3::text[], $4::timestamptz[], $5::text[]) AS u(c0, c1, c2, c3, c4) \
     WHERE t.id = u.c0";
const INSERT_ONE: &str = "INSERT INTO items (id, n, label, at, payload) VALUES ($1::integer, $2::integer, $3::text, $4::timestamptz, $5::text)";
const UPDATE_ONE: &str = "UPDATE items SET n = $2::integer, label = $3::text, at = $4::timestamptz, payload = $5::text WHERE id = $1::integer";

const DELETE_ANY: &str = "DELETE FROM items WHERE id = ANY($1::integer[])";

/// `COPY items FROM STDIN` with `rows` as its data, in the same round trip
/// (extended protocol: the data follows the Execute).
fn copy_from_stdin(rows: &[Vec<String>], binary: bool, buf: &mut BytesMut) {
    let format = if binary { " (FORMAT binary)" } else { "" };
    let sql = format!("COPY items (id, n, label, at, payload) FROM STDIN{format}");
    statement(None, true, &sql, &[], buf);
    let mut data = Vec::new();
    if binary {
        data.extend_from_slice(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0");
        for r in rows {
            data.extend_from_slice(&5i16.to_be_bytes());
            for (j, v) in r.iter().enumerate() {
                let bytes = match j {
                    0 | 1 => v.parse::<i32>().unwrap().to_be_bytes().to_vec(),
                    3 => 943_963_200_000_000i64.to_be_bytes().to_vec(), // 2029-11-30 12:00:00+00
                    _ => v.as_bytes().to_vec(),
                };
                data.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                data.extend_from_slice(&bytes);
            }
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
    } else {
        for r in rows {
            data.extend_from_slice(r.join("\t").as_bytes());
            data.push(b'\n');
        }
    }
    frontend::CopyData::new(&data[..]).unwrap().write(buf);
    frontend::copy_done(buf);
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let tick = 100.0; // USER_HZ
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / tick
}

fn statement(named: Option<&str>, parse: bool, sql: &str, params: &[String], buf: &mut BytesMut) {
    let name = named.unwrap_or("");
    if parse || named.is_none() {
        frontend::parse(name, sql, params.iter().map(|_| 0u32), buf).unwrap();
    }
    let fmt = |p: &String, out: &mut BytesMut| {
        out.extend_from_slice(p.as_bytes());
        Ok::<_, Box<dyn std::error::Error + Sync + Send>>(IsNull::No)
    };
    if frontend::bind("", name, Some(0), params, fmt, Some(0), buf).is_err() {
        panic!("bind");
    }
    frontend::execute("", 0, buf).unwrap();
}

#[tokio::main]
async fn main() {
    let txns: usize = std::env::var("TXNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let dir = tempfile_dir();
    let instance = Instance::start(InstanceOptions::persistent(&dir)).await.unwrap();
    instance
        .exec(
            "CREATE TABLE items (id int PRIMARY KEY, n int, label text, at timestamptz, payload text); \
             INSERT INTO items SELECT g, g, 'label', now(), repeat('x', 60) FROM generate_series(1, 100000) g; \
             CREATE TABLE lsn (singleton boolean PRIMARY KEY DEFAULT true, applied_lsn pg_lsn, \
             applied_commit_time timestamptz, updated_at timestamptz); INSERT INTO lsn DEFAULT VALUES; CHECKPOINT",
        )
        .await
        .unwrap();
    let row = |id: usize| -> Vec<String> {
        vec![id.to_string(), id.to_string(), "label".into(), "2026-11-30 12:00:00+00".into(), "x".repeat(60)]
    };
    let arrays = |r: Vec<String>| -> Vec<String> { r.into_iter().map(|v| format!("{{\"{v}\"}}")).collect() };
    type Shape = (&'static str, Vec<&'static str>);
    let shapes: Vec<Shape> = vec![
        ("SELECT 1", vec!["SELECT 1"]),
        ("settings", vec![SETTINGS]),
        ("settings + LSN", vec![SETTINGS, LSN]),
        ("settings + unnest INSERT + unnest UPDATE + LSN (today)", vec![SETTINGS, INSERT_UNNEST, UPDATE_UNNEST, LSN]),
        ("settings + one-row INSERT + one-row UPDATE + LSN", vec![SETTINGS, INSERT_ONE, UPDATE_ONE, LSN]),
        ("one-row INSERT + one-row UPDATE", vec![INSERT_ONE, UPDATE_ONE]),
        ("flag settings + LSN", vec![SETTINGS_FLAG, LSN]),
        ("flag settings + unnest INSERT + unnest UPDATE + LSN", vec![SETTINGS_FLAG, INSERT_UNNEST, UPDATE_UNNEST, LSN]),
        ("flag settings + one-row INSERT + one-row UPDATE + LSN", vec![SETTINGS_FLAG, INSERT_ONE, UPDATE_ONE, LSN]),
    ];
    // The other modes, one per environment variable (see the top).
    let batch_rows = std::env::var("BATCH_ROWS").ok().and_then(|v| v.parse().ok());
    let other_mode =
        batch_rows.is_some() || std::env::var_os("LSN_SHAPES").is_some() || std::env::var_os("TRIGGERS").is_some();
    if other_mode {
        match batch_rows {
            Some(k) => batch_shapes(&instance, txns, k, row).await,
            None if std::env::var_os("LSN_SHAPES").is_some() => lsn_shapes(&instance, txns, row).await,
            None => triggers(&instance, txns, row).await,
        }
        instance.stop().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut next_id = 200_000;
    let mut session = instance.raw_session();
    let mut serial = 0;
    let passes: Vec<bool> = if std::env::var_os("PREPARED_ONLY").is_some() { vec![true] } else { vec![false, true] };
    for &named in &passes {
        for (label, statements) in &shapes {
            let names: Vec<String> = statements
                .iter()
                .map(|_| {
                    serial += 1;
                    format!("bench_{serial}")
                })
                .collect();
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            for i in 0..txns {
                let mut buf = BytesMut::new();
                for (k, sql) in statements.iter().enumerate() {
                    let params: Vec<String> = match *sql {
                        s if s == LSN => vec![format!("0/{:X}", 1000 + i), (i as i64).to_string()],
                        s if s == INSERT_UNNEST => arrays(row(next_id)),
                        s if s == UPDATE_UNNEST => arrays(row(1 + i % 100_000)),
                        s if s == INSERT_ONE => row(next_id),
                        s if s == UPDATE_ONE => row(1 + i % 100_000),
                        _ => vec![],
                    };
                    let name = named.then(|| names[k].as_str());
                    statement(name, i == 0, sql, &params, &mut buf);
                }
                next_id += 1;
                frontend::sync(&mut buf);
                let out = session.round_trip(buf).await.unwrap();
                check(&out, label);
            }
            let wall = t0.elapsed().as_secs_f64() * 1e6 / txns as f64;
            let cpu = (cpu_seconds() - cpu0) * 1e6 / txns as f64;
            println!(
                "{:>8} | {label:<55} | {wall:7.1} µs wall | {cpu:7.1} µs CPU per txn",
                if named { "prepared" } else { "unnamed" }
            );
        }
    }
    // Fails loudly if a statement was wrong (the loop does not decode replies).
    let count = instance.query("SELECT count(*)::int8 FROM items", &[]).await.unwrap();
    let n: i64 = count.rows[0].get(0);
    let with_insert = shapes.iter().filter(|(_, s)| s.iter().any(|q| q.starts_with("INSERT"))).count();
    assert_eq!(n as usize, 100_000 + with_insert * passes.len() * txns, "every INSERT applied");
    instance.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `TRIGGERS=1`: the cost of the cache tables' read-only statement trigger
/// (a PL/pgSQL function checking `pglite_cache.applying`) against a trigger
/// whose `WHEN` clause skips the call during the apply, and of the commit's
/// WAL write (`synchronous_commit = off` for the transaction), on the
/// apply's small-transaction shape (prepared, one-row statements).
async fn triggers(instance: &Instance, txns: usize, row: impl Fn(usize) -> Vec<String>) {
    instance
        .exec(
            "CREATE FUNCTION refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF current_setting('pglite_cache.applying', true) = 'on' THEN RETURN NULL; END IF; \
             RAISE EXCEPTION 'read-only'; END $$",
        )
        .await
        .unwrap();
    let async_settings = format!("{SETTINGS_FLAG}, set_config('synchronous_commit', 'off', true)");
    let setups: [(&str, &str, &str); 4] = [
        ("no trigger", "SELECT 1", SETTINGS_FLAG),
        (
            "PL/pgSQL statement trigger",
            "CREATE TRIGGER ro BEFORE INSERT OR UPDATE OR DELETE ON items FOR EACH STATEMENT EXECUTE FUNCTION refuse_write()",
            SETTINGS_FLAG,
        ),
        ("same, synchronous_commit off", "SELECT 1", async_settings.as_str()),
        (
            "trigger with WHEN skipping the call",
            "DROP TRIGGER ro ON items; CREATE TRIGGER ro BEFORE INSERT OR UPDATE OR DELETE ON items FOR EACH STATEMENT \
             WHEN (current_setting('pglite_cache.applying', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION refuse_write()",
            SETTINGS_FLAG,
        ),
    ];
    let mut session = instance.raw_session();
    let mut next_id = 300_000;
    for (k, (label, setup, settings)) in setups.iter().enumerate() {
        instance.exec(setup).await.unwrap();
        let statements = [*settings, INSERT_ONE, UPDATE_ONE, LSN];
        let (wall, cpu) =
            one_row_transactions(&mut session, &statements, txns, &row, &mut next_id, label, &format!("trig_{k}"))
                .await;
        println!("{label:<40} | {wall:7.1} µs wall | {cpu:7.1} µs CPU per txn");
    }
}

/// Runs `txns` transactions of `statements` (prepared once, under names
/// starting with `prefix`): [`INSERT_ONE`] inserts a new row, [`UPDATE_ONE`]
/// updates an existing one, anything else gets an LSN and a commit time.
/// Wall and CPU time per transaction, in µs.
async fn one_row_transactions(
    session: &mut pglite_cache::RawSession,
    statements: &[&str],
    txns: usize,
    row: &impl Fn(usize) -> Vec<String>,
    next_id: &mut usize,
    label: &str,
    prefix: &str,
) -> (f64, f64) {
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for i in 0..txns {
        let mut buf = BytesMut::new();
        for (j, sql) in statements.iter().enumerate() {
            let params: Vec<String> = match *sql {
                s if s == INSERT_ONE => row(*next_id),
                s if s == UPDATE_ONE => row(1 + i % 100_000),
                s if s.starts_with("SELECT") => vec![],
                _ => vec![format!("0/{:X}", 1000 + i), (i as i64).to_string()],
            };
            statement(Some(&format!("{prefix}_{j}")), i == 0, sql, &params, &mut buf);
        }
        *next_id += 1;
        frontend::sync(&mut buf);
        let out = session.round_trip(buf).await.unwrap();
        check(&out, label);
    }
    let wall = t0.elapsed().as_secs_f64() * 1e6 / txns as f64;
    let cpu = (cpu_seconds() - cpu0) * 1e6 / txns as f64;
    (wall, cpu)
}

/// `LSN_SHAPES=1`: what the stored-LSN update costs a small transaction
/// (prepared, one-row INSERT and UPDATE), by how many settings its `WHERE`
/// clause sets, against the statements alone.
async fn lsn_shapes(instance: &Instance, txns: usize, row: impl Fn(usize) -> Vec<String>) {
    let four = "set_config('pglite_cache.applying', 'on', true) IS NOT NULL \
         AND set_config('enable_hashjoin', 'off', true) IS NOT NULL \
         AND set_config('enable_mergejoin', 'off', true) IS NOT NULL \
         AND set_config('plan_cache_mode', 'force_generic_plan', true) IS NOT NULL";
    let one = "set_config('pglite_cache.applying', 'on', true) IS NOT NULL";
    let shapes: [(&str, Option<String>); 4] = [
        ("INSERT + UPDATE, nothing else", None),
        ("+ LSN update, no WHERE, 4 settings (before)", Some(format!("{LSN} WHERE {four}"))),
        ("+ LSN update WHERE singleton AND 4 settings", Some(format!("{LSN} WHERE singleton AND {four}"))),
        ("+ LSN update WHERE singleton AND the flag", Some(format!("{LSN} WHERE singleton AND {one}"))),
    ];
    let mut session = instance.raw_session();
    let mut next_id = 400_000;
    for round in 0..2 {
        for (k, (label, lsn)) in shapes.iter().enumerate() {
            let mut statements: Vec<&str> = lsn.iter().map(String::as_str).collect();
            statements.extend([INSERT_ONE, UPDATE_ONE]);
            let prefix = format!("lsn_{round}_{k}");
            let (wall, cpu) =
                one_row_transactions(&mut session, &statements, txns, &row, &mut next_id, label, &prefix).await;
            println!("{label:<45} | {wall:7.1} µs wall | {cpu:7.1} µs CPU per txn");
        }
    }
}

/// `BATCH_ROWS=K`: a merged transaction of K inserted and K updated rows,
/// as one `unnest` statement per kind against K executions of the one-row
/// statements (all prepared, one round trip either way).
async fn batch_shapes(instance: &Instance, txns: usize, k: usize, row: impl Fn(usize) -> Vec<String>) {
    let arrays = |rows: Vec<Vec<String>>| -> Vec<String> {
        (0..rows[0].len())
            .map(|c| format!("{{{}}}", rows.iter().map(|r| format!("\"{}\"", r[c])).collect::<Vec<_>>().join(",")))
            .collect()
    };
    let mut session = instance.raw_session();
    let mut next_id = 1_000_000;
    let mut parsed = std::collections::HashSet::new();
    for shape in [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5] {
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        for i in 0..txns {
            let mut buf = BytesMut::new();
            let mut add = |name: &str, sql: &str, params: Vec<String>, buf: &mut BytesMut| {
                let parse = parsed.insert(name.to_string());
                statement(Some(name), parse, sql, &params, buf);
            };
            add("b_settings", SETTINGS_FLAG, vec![], &mut buf);
            let inserts: Vec<Vec<String>> = (0..k).map(|j| row(next_id + j)).collect();
            let updates: Vec<Vec<String>> = (0..k).map(|j| row(1 + (i * k + j) % 100_000)).collect();
            next_id += k;
            match shape {
                0 => {
                    add("b_insert_unnest", INSERT_UNNEST, arrays(inserts), &mut buf);
                    add("b_update_unnest", UPDATE_UNNEST, arrays(updates), &mut buf);
                }
                1 => {
                    add("b_insert_typed", INSERT_TYPED, arrays(inserts), &mut buf);
                    add("b_update_typed", UPDATE_TYPED, arrays(updates), &mut buf);
                }
                2 => {
                    for r in inserts {
                        add("b_insert_one", INSERT_ONE, r, &mut buf);
                    }
                    for r in updates {
                        add("b_update_one", UPDATE_ONE, r, &mut buf);
                    }
                }
                5 => {
                    // Inserts by COPY (binary), updates by `unnest`.
                    copy_from_stdin(&inserts, true, &mut buf);
                    add("b_update_unnest", UPDATE_UNNEST, arrays(updates), &mut buf);
                }
                _ => {
                    // COPY ... FROM STDIN in the same round trip, text or
                    // binary; updates as a delete and a COPY.
                    let binary = shape == 4;
                    let ids: Vec<String> = updates.iter().map(|r| r[0].clone()).collect();
                    add("b_delete_any", DELETE_ANY, vec![format!("{{{}}}", ids.join(","))], &mut buf);
                    let mut rows = inserts;
                    rows.extend(updates);
                    copy_from_stdin(&rows, binary, &mut buf);
                }
            }
            add("b_lsn", LSN, vec![format!("0/{:X}", 1000 + i), (i as i64).to_string()], &mut buf);
            frontend::sync(&mut buf);
            let out = session.round_trip(buf).await.unwrap();
            check(&out, "batch");
        }
        let per_row = t0.elapsed().as_secs_f64() * 1e6 / (txns * k) as f64;
        let cpu = (cpu_seconds() - cpu0) * 1e6 / (txns * k) as f64;
        let label = [
            "unnest of text arrays, cast",
            "unnest of typed arrays",
            "one-row statements, K executions",
            "COPY FROM STDIN, text",
            "COPY FROM STDIN, binary",
            "COPY binary inserts, unnest updates",
        ][shape];
        println!("K={k:<4} {label:<34} | {per_row:7.1} µs wall | {cpu:7.1} µs CPU per inserted + updated row");
    }
}

/// Panics on an `ErrorResponse` in the reply.
fn check(out: &[u8], label: &str) {
    let mut buf = BytesMut::from(out);
    while let Some(message) = Message::parse(&mut buf).unwrap() {
        if let Message::ErrorResponse(body) = message {
            let fields: Vec<String> =
                body.fields().map(|f| Ok(String::from_utf8_lossy(f.value_bytes()).into_owned())).collect().unwrap();
            panic!("{label}: {fields:?}");
        }
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("plc-engine-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
