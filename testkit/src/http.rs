//! A minimal HTTP/1.1 client for calling the device service's API in tests: one request per
//! connection, a JSON body in, the status and the JSON body out. Small on purpose: the tests
//! want to see the bytes a client sends, not a client library's behaviour.
//!
//! Who calls is part of the target ([`Api`]): nobody, one API key, or the legitimate parties of
//! the flows ([`Parties`]), where the caller is whoever would call that route in production (the
//! shop's backend for orders, the owner app for activation steps, the payment provider, with its
//! signature, for callbacks, an operator for the rest).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The keys and the payment secret of the parties of the flows.
#[derive(Debug, Clone)]
pub struct Parties {
    /// An `operator` key.
    pub operator: String,
    /// A `viewer` key.
    pub viewer: String,
    /// A `shop` key.
    pub shop: String,
    /// An `owner_app` key.
    pub owner_app: String,
    /// The payment provider's name.
    pub provider: String,
    /// Its shared secret.
    pub provider_secret: String,
}

impl Parties {
    /// Makes a key for each party with `key(role, tenant)` (roles by their API names; the shop's
    /// tenant is `shop-1`), and names the payment provider.
    pub async fn make<F, Fut>(provider: &str, provider_secret: &str, mut key: F) -> Self
    where
        F: FnMut(&'static str, Option<&'static str>) -> Fut,
        Fut: std::future::Future<Output = String>,
    {
        Self {
            operator: key("operator", None).await,
            viewer: key("viewer", None).await,
            shop: key("shop", Some("shop-1")).await,
            owner_app: key("owner_app", None).await,
            provider: provider.to_owned(),
            provider_secret: provider_secret.to_owned(),
        }
    }

    /// The key of whoever calls `method path` in production (`None` for the payment callback,
    /// which is signed instead).
    pub fn key_for(&self, method: &str, path: &str) -> Option<&str> {
        let path = path.split('?').next().unwrap_or(path);
        if path == "/v1/payments/callback" || path == "/v1/contracts/callback" {
            None
        } else if path == "/v1/orders" && method == "POST" {
            Some(&self.shop)
        } else if path.starts_with("/v1/activations/") && method == "POST" {
            Some(&self.owner_app)
        } else {
            Some(&self.operator)
        }
    }
}

/// Who calls.
#[derive(Debug, Clone, Copy)]
pub enum Caller {
    /// No credentials.
    Anonymous,
    /// This API key (leaked: a test's lifetime).
    Key(&'static str),
    /// Whoever would call the route (see [`Parties::key_for`]).
    Parties(&'static Parties),
}

/// The API at `addr`, called as `caller`.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Who calls.
    pub caller: Caller,
}

impl From<SocketAddr> for Api {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, caller: Caller::Anonymous }
    }
}

impl Api {
    /// The API called by the parties of the flows.
    pub fn parties(addr: SocketAddr, parties: Parties) -> Self {
        Self { addr, caller: Caller::Parties(Box::leak(Box::new(parties))) }
    }

    /// The same API called with `key`.
    pub fn with_key(self, key: &str) -> Self {
        Self { addr: self.addr, caller: Caller::Key(Box::leak(key.to_owned().into_boxed_str())) }
    }

    /// The same API called without credentials.
    pub fn anonymous(self) -> Self {
        Self { addr: self.addr, caller: Caller::Anonymous }
    }

    /// The parties, if this API is called by them.
    pub fn parties_of(&self) -> Option<&'static Parties> {
        match self.caller {
            Caller::Parties(p) => Some(p),
            _ => None,
        }
    }

    /// The headers this caller adds to `method path` with `body`.
    fn credentials(&self, method: &str, path: &str, body: &str) -> String {
        match self.caller {
            Caller::Anonymous => String::new(),
            Caller::Key(key) => format!("Authorization: Bearer {key}\r\n"),
            Caller::Parties(p) => match p.key_for(method, path) {
                Some(key) => format!("Authorization: Bearer {key}\r\n"),
                None => {
                    let now =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    let signature = protocol::payment::header(p.provider_secret.as_bytes(), now, body.as_bytes());
                    format!("X-Payment-Provider: {}\r\nX-Payment-Signature: {signature}\r\n", p.provider)
                }
            },
        }
    }

    /// An HTTP/1.1 request with `body` sent as `content_type` and this caller's credentials,
    /// closing the connection after it.
    pub fn request(&self, method: &str, path: &str, content_type: &str, body: &str) -> String {
        let credentials = self.credentials(method, path, body);
        format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\n{credentials}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Calls the API: `(status, JSON body)` (`Null` for an empty body, a JSON string for a body
/// that is not JSON).
///
/// # Panics
/// When the server cannot be reached, does not answer within 30 s, or answers something that
/// is not HTTP: the test cannot go on.
pub async fn call(api: impl Into<Api>, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let api = api.into();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    call_raw(api.addr, &api.request(method, path, "application/json", &body)).await
}

/// An anonymous HTTP/1.1 request with `body` sent as `content_type`.
pub fn request(method: &str, path: &str, content_type: &str, body: &str) -> String {
    Api::from(SocketAddr::from(([127, 0, 0, 1], 0))).request(method, path, content_type, body)
}

/// Sends `request` as it is and reads the answer: `(status, JSON body)` as [`call`].
///
/// # Panics
/// As [`call`].
pub async fn call_raw(addr: SocketAddr, request: &str) -> (u16, Value) {
    let (status, _, value) = exchange(addr, request).await;
    (status, value)
}

/// Sends `request` and reads the answer: `(status, head, JSON body)`; the head's lines as sent
/// (for tests of headers such as `Retry-After`).
///
/// # Panics
/// As [`call`].
pub async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, Value) {
    let mut tcp =
        TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("failed to connect to the API at {addr}: {e}"));
    tcp.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("failed to send the request: {e}"));
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("no answer within 30 s to {}", request.lines().next().unwrap_or_default()))
        .unwrap_or_else(|e| panic!("failed to read the answer: {e}"));
    let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("answer is not UTF-8: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    let value =
        if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap_or(Value::String(body.into())) };
    (status, head.to_owned(), value)
}

/// Calls the API and expects `status`; returns the body.
///
/// # Panics
/// When the status differs (the message shows the body), or as [`call`].
pub async fn expect(api: impl Into<Api>, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let (got, value) = call(api, method, path, body).await;
    assert_eq!(got, status, "{method} {path} answered {value}");
    value
}
