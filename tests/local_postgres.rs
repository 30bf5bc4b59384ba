//! The throwaway PostgreSQL used by the demo and the replication tests.

use pglite_cache::local_postgres::LocalPostgres;

#[tokio::test]
async fn starts_with_logical_wal_restarts_and_cleans_up() {
    let mut pg = LocalPostgres::start(&[("application_name", "it's")]).expect("start local PostgreSQL");
    let data_dir = pg.data_dir();
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = client.query_one("SHOW application_name", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "it's");
    drop(client);

    pg.stop().unwrap();
    assert!(tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls).await.is_err());
    pg.start_server().unwrap();
    let (client, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();
    drop(pg);
    assert!(!data_dir.exists(), "removed on drop");
}
