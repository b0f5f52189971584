//! A small HTTP/1.1 JSON client for the device service's API (one connection per call), so the
//! harness needs no HTTP stack of its own. Loopback only, like every target of the harness.
//!
//! The harness plays every party of the flows, each with its own credentials, taken from the
//! environment (never from flags, which `ps` shows, nor the report): `IOTGW_OPERATOR_KEY`
//! (seeding, commands, OTA), `IOTGW_SHOP_KEY` (orders), `IOTGW_OWNER_APP_KEY` (activation steps),
//! `IOTGW_PAYMENT_PROVIDER` / `IOTGW_PAYMENT_SECRET` (the signed payment and contract
//! callbacks), and `IOTGW_SHOP_TENANT` (the shop key's tenant, which contract events name).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The credentials of the parties the harness plays.
#[derive(Clone, Default)]
pub struct Parties {
    operator: String,
    shop: String,
    owner_app: String,
    provider: String,
    provider_secret: String,
    shop_tenant: String,
}

impl std::fmt::Debug for Parties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parties").field("provider", &self.provider).finish_non_exhaustive()
    }
}

impl Parties {
    /// From the environment variables of the module header (missing ones are empty: the calls
    /// that need them are then refused by the service, and the harness reports it).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        Self {
            operator: var("IOTGW_OPERATOR_KEY"),
            shop: var("IOTGW_SHOP_KEY"),
            owner_app: var("IOTGW_OWNER_APP_KEY"),
            provider: var("IOTGW_PAYMENT_PROVIDER"),
            provider_secret: var("IOTGW_PAYMENT_SECRET"),
            shop_tenant: var("IOTGW_SHOP_TENANT"),
        }
    }

    /// The headers that authenticate `method path` with `body`: the key of the party that
    /// calls the route, or the provider's signature for its callback.
    fn headers(&self, method: &str, path: &str, body: &str) -> String {
        let key = if path == "/v1/payments/callback" || path == "/v1/contracts/callback" {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let signature = protocol::payment::header(self.provider_secret.as_bytes(), now, body.as_bytes());
            return format!("X-Payment-Provider: {}\r\nX-Payment-Signature: {signature}\r\n", self.provider);
        } else if path == "/v1/orders" && method == "POST" {
            &self.shop
        } else if path.starts_with("/v1/activations/") && method == "POST" {
            &self.owner_app
        } else {
            &self.operator
        };
        format!("Authorization: Bearer {key}\r\n")
    }
}

/// The device service's API at `addr`, called as the parties of the flows.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// Where it listens.
    pub addr: SocketAddr,
    parties: &'static Parties,
}

impl Api {
    /// The API at `addr`, with the parties' credentials from the environment (read once).
    pub fn new(addr: SocketAddr) -> Self {
        static PARTIES: std::sync::OnceLock<Parties> = std::sync::OnceLock::new();
        Self { addr, parties: PARTIES.get_or_init(Parties::from_env) }
    }

    /// The shop key's tenant (`IOTGW_SHOP_TENANT`).
    pub fn shop_tenant(&self) -> &str {
        &self.parties.shop_tenant
    }

    /// Calls `method path` with an optional JSON body; returns the status and the JSON answer
    /// (`Null` when empty). A 429 (the key above its rate) is waited out as `Retry-After` says,
    /// up to five times, as a well-behaved client does.
    ///
    /// # Errors
    /// Connection failures, timeouts (10 s) and answers that are not HTTP.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
        let mut tries = 0;
        loop {
            let (status, retry_after, value) = self.call_once(method, path, body).await?;
            tries += 1;
            match retry_after {
                Some(wait) if status == 429 && tries < 5 => tokio::time::sleep(wait).await,
                _ => return Ok((status, value)),
            }
        }
    }

    async fn call_once(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Option<Duration>, Value)> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.parties.headers(method, path, &body),
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
        let (status, head, value) = answer(&raw)?;
        let retry_after = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .and_then(|s| s.trim().parse().ok())
            .map(Duration::from_secs);
        Ok((status, retry_after, value))
    }

    /// Uploads `len` bytes, produced by `fill` piece by piece (never held whole), to `PUT path`
    /// as the operator; returns the status and the JSON answer.
    ///
    /// # Errors
    /// Connection failures, a stall of 60 s, answers that are not HTTP.
    pub async fn put_stream(
        &self,
        path: &str,
        len: u64,
        mut fill: impl FnMut(&mut [u8]),
    ) -> anyhow::Result<(u16, Value)> {
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.parties.headers("PUT", path, ""),
        );
        let mut tcp = TcpStream::connect(self.addr).await?;
        tcp.write_all(head.as_bytes()).await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while sent < len {
            let n = usize::try_from((len - sent).min(buf.len() as u64)).unwrap_or(buf.len());
            fill(&mut buf[..n]);
            tokio::time::timeout(Duration::from_secs(60), tcp.write_all(&buf[..n]))
                .await
                .context("upload stalled")??;
            sent += n as u64;
        }
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut raw)).await.context("no answer")??;
        let (status, _, value) = answer(&raw)?;
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

/// An HTTP/1.1 answer read to its end: the status, the head, the JSON body (`Null` when empty or
/// not JSON).
fn answer(raw: &[u8]) -> anyhow::Result<(u16, String, Value)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let value = if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(Value::Null) };
    Ok((status, head.to_owned(), value))
}
