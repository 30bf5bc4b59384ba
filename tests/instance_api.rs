//! The instance API against a real embedded engine: parameters, types,
//! errors and transactions.

use pglite_cache::{Error, Instance, InstanceOptions, Param, SqlState, oid, params};
use serde_json::json;

async fn db() -> Instance {
    Instance::start(InstanceOptions::in_memory()).await.expect("start in-memory instance")
}

#[tokio::test]
async fn query_with_parameters_nulls_unicode_and_special_characters() {
    let db = db().await;
    db.exec("CREATE TABLE notes (id int PRIMARY KEY, body text, note text)").await.unwrap();
    let tricky = "it's \"quoted\" \\ back\\slash; -- comment\n\ttab ünïcødé 日本語 🐘";
    let r = db.query("INSERT INTO notes VALUES ($1, $2, $3)", &[&1, &tricky, &None::<String>]).await.unwrap();
    assert_eq!(r.rows_affected(), 1);
    assert_eq!(r.command, "INSERT 0 1");

    let row = &db.query("SELECT body, note FROM notes WHERE id = $1", &[&1]).await.unwrap().rows[0];
    assert_eq!(row.get::<String>("body"), tricky);
    assert_eq!(row.get::<Option<String>>("note"), None);
    assert_eq!(row.get_text(1), None);
    assert_eq!(row.to_json(), json!({"body": tricky, "note": null}));
}

#[tokio::test]
async fn sql_injection_through_parameters_stays_data() {
    let db = db().await;
    db.exec("CREATE TABLE users (name text)").await.unwrap();
    let attack = "x'); DROP TABLE users; --";
    db.query("INSERT INTO users VALUES ($1)", &[&attack]).await.unwrap();
    let r = db.query("SELECT name FROM users WHERE name = $1", &[&attack]).await.unwrap();
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].get::<String>(0), attack);
    let count = db.query("SELECT count(*) FROM users", &[]).await.unwrap();
    assert_eq!(count.rows[0].get::<i64>(0), 1, "the table survived");
}

#[tokio::test]
async fn large_values_round_trip() {
    let db = db().await;
    let big: String = "abcdefghij".repeat(1_000_000); // 10 MB
    db.exec("CREATE TABLE blobs (id int, body text, bin bytea)").await.unwrap();
    let bin: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    db.query("INSERT INTO blobs VALUES (1, $1, $2)", &[&big, &bin]).await.unwrap();
    let row = &db.query("SELECT body, bin, length(body) AS n FROM blobs", &[]).await.unwrap().rows[0];
    assert_eq!(row.get::<i32>("n"), 10_000_000);
    assert_eq!(row.get::<String>("body"), big);
    assert_eq!(row.get::<Vec<u8>>("bin"), bin);
}

#[tokio::test]
async fn many_data_types_convert_to_rust_and_json() {
    let db = db().await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE types (
           i2 int2, i4 int4, i8 int8, n numeric, f4 float4, f8 float8, b bool, t text, by bytea,
           js json, jb jsonb, u uuid, d date, ts timestamp, tz timestamptz, ia int[], ta text[], m mood)",
    )
    .await
    .unwrap();
    let uuid = uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
    let date = chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
    let ts = date.and_hms_micro_opt(13, 14, 15, 123456).unwrap();
    let tz = ts.and_utc();
    db.query_params(
        "INSERT INTO types VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18)",
        params![
            -32768_i16,
            2147483647_i32,
            i64::MIN,
            Param::Untyped("12345678901234567890.123456789".into()),
            1.5_f32,
            std::f64::consts::PI,
            true,
            "text",
            vec![0_u8, 1, 254, 255],
            json!({"a": [1, 2]}),
            json!({"nested": {"k": "v"}, "n": null}),
            uuid,
            date,
            ts,
            tz,
            json!([1, 2, 3]).to_string().replace('[', "{").replace(']', "}"),
            "{\"a b\",\"c,d\",NULL}",
            "happy"
        ],
    )
    .await
    .unwrap();
    db.exec("SET TIME ZONE 'UTC'").await.unwrap();
    let r = db.query("SELECT * FROM types", &[]).await.unwrap();
    let row = &r.rows[0];
    assert_eq!(row.get::<i16>("i2"), -32768);
    assert_eq!(row.get::<i32>("i4"), 2147483647);
    assert_eq!(row.get::<i64>("i8"), i64::MIN);
    assert_eq!(row.get::<String>("n"), "12345678901234567890.123456789");
    assert_eq!(row.get::<f32>("f4"), 1.5);
    assert_eq!(row.get::<f64>("f8"), std::f64::consts::PI);
    assert!(row.get::<bool>("b"));
    assert_eq!(row.get::<Vec<u8>>("by"), vec![0, 1, 254, 255]);
    assert_eq!(row.get::<serde_json::Value>("jb"), json!({"nested": {"k": "v"}, "n": null}));
    assert_eq!(row.get::<uuid::Uuid>("u"), uuid);
    assert_eq!(row.get::<chrono::NaiveDate>("d"), date);
    assert_eq!(row.get::<chrono::NaiveDateTime>("ts"), ts);
    assert_eq!(row.get::<chrono::DateTime<chrono::Utc>>("tz"), tz);
    assert_eq!(row.get::<String>("m"), "happy");

    let cols: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(&cols[..3], &[oid::INT2, oid::INT4, oid::INT8]);
    assert_eq!(
        row.to_json_array(),
        vec![
            json!(-32768),
            json!(2147483647),
            json!(i64::MIN),
            json!("12345678901234567890.123456789"),
            json!(1.5),
            json!(std::f64::consts::PI),
            json!(true),
            json!("text"),
            json!("\\x0001feff"),
            json!({"a": [1, 2]}),
            json!({"n": null, "nested": {"k": "v"}}),
            json!(uuid.to_string()),
            json!("2024-02-29"),
            json!("2024-02-29 13:14:15.123456"),
            json!("2024-02-29 13:14:15.123456+00"),
            json!([1, 2, 3]),
            json!(["a b", "c,d", null]),
            json!("happy"),
        ]
    );
}

#[tokio::test]
async fn typed_parameters_keep_their_type() {
    let db = db().await;
    let r =
        db.query("SELECT $1 AS a, $2 AS b, $3 AS c, upper($4) AS d", &[&7_i64, &2.5_f64, &false, &"x"]).await.unwrap();
    let types: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(types, vec![oid::INT8, oid::FLOAT8, oid::BOOL, oid::TEXT]);
    assert_eq!(r.rows[0].get::<String>("d"), "X");
    // Untyped text is inferred from context, like a literal.
    let r = db.query("SELECT $1::int + 1 AS n, substr('hello', $2) AS s", &[&"41", &2_i32]).await.unwrap();
    assert_eq!(r.rows[0].get::<i32>("n"), 42);
    assert_eq!(r.rows[0].get::<String>("s"), "ello");
}

#[tokio::test]
async fn exec_returns_every_statement_result() {
    let db = db().await;
    let results = db
        .exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2); SELECT id FROM t ORDER BY id; UPDATE t SET id = id + 1")
        .await
        .unwrap();
    let tags: Vec<&str> = results.iter().map(|r| r.command.as_str()).collect();
    assert_eq!(tags, vec!["CREATE TABLE", "INSERT 0 2", "SELECT 2", "UPDATE 2"]);
    assert_eq!(results[2].rows.iter().map(|r| r.get::<i32>(0)).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(results[3].to_json(), json!({"command": "UPDATE", "rows_affected": 2}));
}

#[tokio::test]
async fn errors_are_typed_and_the_instance_keeps_serving() {
    let db = db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY CHECK (id > 0))").await.unwrap();

    let syntax = db.query("SELEC 1", &[]).await.unwrap_err();
    let e = syntax.as_db_error().expect("database error");
    assert_eq!(e.code, SqlState::SYNTAX_ERROR);
    assert_eq!(e.severity, "ERROR");
    assert_eq!(e.position, Some(1));

    let missing = db.query("SELECT * FROM nope", &[]).await.unwrap_err();
    assert_eq!(missing.code(), Some(&SqlState::UNDEFINED_TABLE));

    db.query("INSERT INTO t VALUES ($1)", &[&1]).await.unwrap();
    let dup = db.query("INSERT INTO t VALUES ($1)", &[&1]).await.unwrap_err();
    let e = dup.as_db_error().unwrap();
    assert_eq!(e.code, SqlState::UNIQUE_VIOLATION);
    assert_eq!(e.constraint.as_deref(), Some("t_pkey"));
    assert_eq!(e.table.as_deref(), Some("t"));
    assert!(e.detail.as_deref().unwrap().contains("(id)=(1)"));

    let check = db.query("INSERT INTO t VALUES ($1)", &[&-1]).await.unwrap_err();
    assert_eq!(check.code(), Some(&SqlState::CHECK_VIOLATION));

    // Wrong parameter count and wrong parameter types.
    let count = db.query("SELECT $1::int, $2::int", &[&1]).await.unwrap_err();
    assert_eq!(count.code(), Some(&SqlState::PROTOCOL_VIOLATION), "{count}");
    let bad_type = db.query("INSERT INTO t VALUES ($1)", &[&"not a number"]).await.unwrap_err();
    assert_eq!(bad_type.code(), Some(&SqlState::INVALID_TEXT_REPRESENTATION));
    let multi = db.query("SELECT 1; SELECT 2", &[]).await.unwrap_err();
    assert_eq!(multi.code(), Some(&SqlState::SYNTAX_ERROR));

    // Conversion errors are ours, not the database's.
    let r = db.query("SELECT 'abc' AS s, NULL::int AS n", &[]).await.unwrap();
    assert!(matches!(r.rows[0].try_get::<i32>("s"), Err(Error::Conversion { .. })));
    assert!(matches!(r.rows[0].try_get::<i32>("n"), Err(Error::Conversion { .. })));
    assert!(matches!(r.rows[0].try_get::<i32>("zzz"), Err(Error::ColumnNotFound(_))));

    db.health_check().await.expect("still healthy after errors");
    let ok = db.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(ok.rows[0].get::<i64>(0), 1);
}

#[tokio::test]
async fn a_failed_statement_in_exec_rolls_back_the_script() {
    let db = db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let err = db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (1)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let n = db.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(n.rows[0].get::<i64>(0), 0);
}

#[tokio::test]
async fn transaction_batch_is_all_or_nothing() {
    let db = db().await;
    db.exec("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL CHECK (balance >= 0))").await.unwrap();
    let ok = db
        .transaction(&[
            ("INSERT INTO accounts VALUES ($1, $2)", params![1, 100]),
            ("INSERT INTO accounts VALUES ($1, $2)", params![2, 0]),
            ("SELECT sum(balance) FROM accounts", params![]),
        ])
        .await
        .unwrap();
    assert_eq!(ok.len(), 3);
    assert_eq!(ok[2].rows[0].get::<i64>(0), 100);

    let err = db
        .transaction(&[
            ("UPDATE accounts SET balance = balance + $1 WHERE id = 2", params![50]),
            ("UPDATE accounts SET balance = balance - $1 WHERE id = 1", params![500]),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION));
    let balances = db.query("SELECT balance FROM accounts ORDER BY id", &[]).await.unwrap();
    let b: Vec<i32> = balances.rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(b, vec![100, 0], "the first update was rolled back too");
}

#[tokio::test]
async fn interactive_transaction_commit_rollback_and_drop() {
    let db = db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();

    let tx = db.begin().await.unwrap();
    tx.query("INSERT INTO t VALUES ($1)", &[&1]).await.unwrap();
    let inside = tx.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(inside.rows[0].get::<i64>(0), 1, "a transaction reads its own writes");
    tx.commit().await.unwrap();

    let tx = db.begin().await.unwrap();
    tx.query("INSERT INTO t VALUES ($1)", &[&2]).await.unwrap();
    tx.rollback().await.unwrap();

    {
        let tx = db.begin().await.unwrap();
        tx.query("INSERT INTO t VALUES ($1)", &[&3]).await.unwrap();
        // dropped without commit
    }

    // A failing statement poisons the transaction; commit reports the rollback.
    let tx = db.begin().await.unwrap();
    tx.query("INSERT INTO t VALUES ($1)", &[&4]).await.unwrap();
    let dup = tx.query("INSERT INTO t VALUES ($1)", &[&1]).await.unwrap_err();
    assert_eq!(dup.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let aborted = tx.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(aborted.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    assert!(matches!(tx.commit().await, Err(Error::RolledBack)));

    let ids = db.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap();
    assert_eq!(ids.rows.iter().map(|r| r.get::<i32>(0)).collect::<Vec<_>>(), vec![1]);
}

#[tokio::test]
async fn a_statement_that_leaves_a_transaction_open_is_refused() {
    let db = db().await;
    db.exec("CREATE TABLE t (id int)").await.unwrap();
    let err = db.exec("BEGIN; INSERT INTO t VALUES (1)").await.unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err}");
    let n = db.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(n.rows[0].get::<i64>(0), 0, "rolled back, nothing leaked to other callers");
}

#[tokio::test]
async fn copy_from_stdin_is_refused_cleanly() {
    let db = db().await;
    db.exec("CREATE TABLE t (id int)").await.unwrap();
    let err = db.exec("COPY t FROM STDIN").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let err = db.query("COPY t FROM STDIN", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    let err = db.exec("INSERT INTO t VALUES (1); COPY t FROM STDIN").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    db.query("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    let n = db.query("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(n.rows[0].get::<i64>(0), 1);
}
