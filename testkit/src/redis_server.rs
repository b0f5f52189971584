//! Private `redis-server` processes for tests that must stop, restart or cluster Redis: the
//! shared server of a run must never be touched, so such tests start their own.
//!
//! Needs `redis-server` and `redis-cli` on the PATH (`scripts/test` installs them).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` child process, killed on drop: without persistence, or with the
/// append-only file as production runs it ([`RedisServer::start_durable`]).
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
    durable: bool,
    child: Option<Child>,
}

/// A free local port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        if port != 0 && port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    ///
    /// # Panics
    /// If `redis-server` cannot be started or does not answer within 10 s.
    pub fn start() -> Self {
        Self::spawn(free_port(), false, false)
    }

    /// Starts a server with the append-only file fsynced every second (`appendfsync
    /// everysec`), as the README's deployment section requires: [`RedisServer::restart`] then
    /// finds what it had confirmed.
    ///
    /// # Panics
    /// As [`RedisServer::start`].
    pub fn start_durable() -> Self {
        Self::spawn(free_port(), false, true)
    }

    fn spawn(port: u16, cluster: bool, durable: bool) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("redis"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut s = Self { port, dir, cluster, durable, child: None };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.arg("--dir").arg(&self.dir).stdout(Stdio::null()).stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        let child = cmd.spawn().expect("failed to start redis-server (is it installed? scripts/test installs it)");
        self.child = Some(child);
        wait_until(Duration::from_secs(10), || self.ping()).expect("redis-server did not answer");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// Kills the server (like a crash) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port: empty, or, for a durable server, with what its
    /// append-only file holds.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of private servers, one master per node, no replicas.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-mode servers, creates the cluster with `redis-cli
    /// --cluster create`, and waits until every node reports `cluster_state:ok`.
    ///
    /// # Panics
    /// If the servers or `redis-cli` cannot be run, or the cluster does not form in 20 s.
    pub fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n).map(|_| RedisServer::spawn(free_port(), true, false)).collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("failed to run redis-cli (is it installed? scripts/test installs it)");
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes };
        wait_until(Duration::from_secs(20), || cluster.nodes.iter().all(RedisServer::cluster_ok))
            .expect("cluster did not reach cluster_state:ok");
        cluster
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

impl RedisServer {
    fn cluster_ok(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
            .is_ok_and(|info| info.contains("cluster_state:ok"))
    }
}

/// Polls `ready` every 50 ms until it holds or `limit` passes: for waiting on an external
/// process, which offers nothing to await.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    const STEP: Duration = Duration::from_millis(50);
    for _ in 0..=limit.as_millis() / STEP.as_millis() {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(STEP);
    }
    Err(())
}
