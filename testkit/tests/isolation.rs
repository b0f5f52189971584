//! The helpers against the real servers: a database is created, usable and dropped; a
//! namespace's keys are deleted and nothing outside it is touched.

use testkit::{RedisNamespace, TestDatabase};

#[tokio::test]
async fn database_is_fresh_usable_and_dropped() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)").await.expect("ddl");
    let row = client.query_one("SELECT count(*) FROM t", &[]).await.expect("count");
    assert_eq!(row.get::<_, i64>(0), 2);
    let name = db.name.clone();
    drop(client);
    drop(db);

    let (admin, conn) = tokio_postgres::connect(&testkit::database_url(), tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    let n: i64 =
        admin.query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&name]).await.expect("lookup").get(0);
    assert_eq!(n, 0, "database {name} should be gone");
}

#[test]
fn namespace_keys_are_deleted_and_others_kept() {
    let outside = format!("{}:outside", testkit::unique_name("guard"));
    let client = redis::Client::open(testkit::redis_url()).expect("url");
    let mut con = client.get_connection().expect("redis reachable");
    let ns = RedisNamespace::create();
    for i in 0..2500 {
        let _: () = redis::cmd("SET").arg(format!("{}k{i}", ns.prefix)).arg(i).query(&mut con).expect("set");
    }
    let _: () = redis::cmd("SET").arg(&outside).arg(1).query(&mut con).expect("set");

    assert_eq!(ns.clear().expect("clear"), 2500);
    let left: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", ns.prefix)).query(&mut con).expect("keys");
    assert!(left.is_empty());
    let kept: i64 = redis::cmd("EXISTS").arg(&outside).query(&mut con).expect("exists");
    assert_eq!(kept, 1);
    let _: () = redis::cmd("DEL").arg(&outside).query(&mut con).expect("del");
}

#[test]
fn private_server_restarts_empty_on_the_same_port() {
    let mut server = testkit::redis_server::RedisServer::start();
    let client = redis::Client::open(server.url()).expect("url");
    let mut con = client.get_connection().expect("up");
    let _: () = redis::cmd("SET").arg("k").arg(1).query(&mut con).expect("set");
    let port = server.port;
    server.restart();
    assert_eq!(server.port, port);
    let mut con = client.get_connection().expect("up again");
    let v: Option<i64> = redis::cmd("GET").arg("k").query(&mut con).expect("get");
    assert_eq!(v, None, "no persistence");
}

#[test]
fn private_cluster_forms() {
    let cluster = testkit::redis_server::RedisCluster::start(3);
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("client");
    let mut con = client.get_connection().expect("cluster connection");
    for i in 0..50 {
        let _: () = redis::cmd("SET").arg(format!("key{i}")).arg(i).query(&mut con).expect("set across slots");
    }
    let v: i64 = redis::cmd("GET").arg("key42").query(&mut con).expect("get");
    assert_eq!(v, 42);
}
