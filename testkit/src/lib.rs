//! Isolation for integration tests that talk to the real PostgreSQL and Redis `scripts/test`
//! provides.
//!
//! `scripts/test` exports `DATABASE_URL`, `REDIS_URL` and `TEST_RUN_ID`. Each test asks for a
//! [`TestDatabase`] (a database of its own, created from `DATABASE_URL` and dropped afterwards)
//! and a [`RedisNamespace`] (a key prefix of its own, whose keys are deleted afterwards), so tests
//! run in parallel, and two runs on one machine never see each other's data. Run outside the
//! script, the same defaults as the script apply: the standard local ports.
//!
//! Clean-up happens in `Drop`, on a thread of its own, so it works from sync and async tests
//! alike; anything a crashed test leaves behind carries the run id, and `scripts/test` removes it
//! at the end of the run.

pub mod cabinet;
pub mod http;
pub mod mqtt;
pub mod pki;
pub mod redis_server;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a test helper waits for anything before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// The PostgreSQL server tests use: `DATABASE_URL`, or the local server on the standard port.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis server tests use: `REDIS_URL`, or the local server on the standard port.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The device time for a version-1 login: the wall clock in ms, but always later than the last
/// one this process handed out. A real cabinet's clock has moved on since its previous login;
/// two test logins of one identity within the same millisecond would otherwise be refused
/// `Replayed` (SPEC.md 1.7), which is the gateway right and the test wrong.
pub fn login_time_ms() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let next = |last: u64| now.max(last + 1);
    LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(next(last))).map_or(now, next)
}

/// This run's id: `TEST_RUN_ID` from `scripts/test`, or one made from the process id.
pub fn run_id() -> String {
    std::env::var("TEST_RUN_ID").unwrap_or_else(|_| format!("p{}", std::process::id()))
}

/// A name no other test of any run uses: run id, process id, a counter and the clock.
pub fn unique_name(kind: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("iotgw_{}_{kind}_{}_{n}_{nanos:x}", run_id(), std::process::id()).to_lowercase()
}

/// Replaces the database name (the path) of a PostgreSQL URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // Scheme "postgres://" then authority; the path starts at the first '/' after it.
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("failed to connect to PostgreSQL at {url}: {e} (is scripts/test in use?)"));
    tokio::spawn(connection);
    client
}

/// A PostgreSQL database of the test's own, dropped when this value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// URL of the new database; hand it to the code under test.
    pub url: String,
    /// Its name.
    pub name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database on the server of [`database_url`].
    ///
    /// # Panics
    /// If the server cannot be reached or refuses `CREATE DATABASE`: the test cannot run.
    pub async fn create() -> Self {
        let admin_url = database_url();
        let name = unique_name("db");
        let admin = admin_client(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("failed to create test database {name}: {e}"));
        Self { url: with_database(&admin_url, &name), name, admin_url }
    }

    /// A client connected to the new database.
    pub async fn client(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // A runtime of its own: Drop may run inside or outside a tokio runtime.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// A Redis key prefix of the test's own; its keys are deleted when this value is dropped.
#[derive(Debug)]
pub struct RedisNamespace {
    /// URL of the Redis server.
    pub url: String,
    /// Prefix for every key the code under test writes, ending in `:`.
    pub prefix: String,
}

impl RedisNamespace {
    /// A fresh prefix on the server of [`redis_url`].
    pub fn create() -> Self {
        Self { url: redis_url(), prefix: format!("{}:", unique_name("ns")) }
    }

    /// Deletes every key under the prefix. Returns how many were deleted.
    ///
    /// # Errors
    /// Any Redis error.
    pub fn clear(&self) -> redis::RedisResult<usize> {
        delete_prefix(&self.url, &self.prefix)
    }
}

impl Drop for RedisNamespace {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}

/// Deletes every key starting with `prefix` on the Redis at `url` (SCAN, never KEYS); on a
/// Redis Cluster, call it for every node.
///
/// # Errors
/// Any Redis error.
pub fn delete_prefix(url: &str, prefix: &str) -> redis::RedisResult<usize> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection()?;
    let pattern = format!("{}*", escape_glob(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query(&mut con)?;
        if !keys.is_empty() {
            // One key per command: on a cluster node the keys lie in many slots.
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let n: Vec<usize> = pipe.query(&mut con)?;
            deleted += n.iter().sum::<usize>();
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Metric names starting with `prefix` found between `quote` characters in `text`: the names a
/// metrics module registers (`"gateway_…"`) or a catalogue documents (`` `gateway_…` ``), so a
/// test can require both lists to agree.
pub fn quoted_metric_names(text: &str, prefix: &str, quote: char) -> std::collections::BTreeSet<String> {
    text.split(quote)
        .filter(|s| s.starts_with(prefix) && !s.ends_with('_'))
        .filter(|s| s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_name() {
        assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    }

    #[test]
    fn names_are_unique() {
        assert_ne!(unique_name("a"), unique_name("a"));
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
