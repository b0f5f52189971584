//! A small HTTP/1.1 JSON client for the device service's API (one connection per call), so the
//! harness needs no HTTP stack of its own. Loopback only, like every target of the harness.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The device service's API at `addr`.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Api {
    /// Calls `method path` with an optional JSON body; returns the status and the JSON answer
    /// (`Null` when empty).
    ///
    /// # Errors
    /// Connection failures, timeouts (10 s) and answers that are not HTTP.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut tcp = TcpStream::connect(self.addr).await?;
            tcp.write_all(request.as_bytes()).await?;
            let mut raw = Vec::new();
            tcp.read_to_end(&mut raw).await?;
            anyhow::Ok(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange).await.context("API call timed out")??;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
        let value = if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(Value::Null) };
        Ok((status, value))
    }

    /// Calls and expects one of `ok` statuses.
    ///
    /// # Errors
    /// As [`Api::call`], and any other status.
    pub async fn expect(&self, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        anyhow::ensure!(ok.contains(&status), "{method} {path} answered {status}: {value}");
        Ok(value)
    }
}
