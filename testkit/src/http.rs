//! A minimal HTTP/1.1 client for calling the device service's API in tests: one request per
//! connection, a JSON body in, the status and the JSON body out. Small on purpose: the tests
//! want to see the bytes a client sends, not a client library's behaviour.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Calls the API: `(status, JSON body)` (`Null` for an empty body, a JSON string for a body
/// that is not JSON).
///
/// # Panics
/// When the server cannot be reached, does not answer within 30 s, or answers something that
/// is not HTTP: the test cannot go on.
pub async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    call_raw(addr, &request(method, path, "application/json", &body)).await
}

/// An HTTP/1.1 request with `body` sent as `content_type`, closing the connection after it.
pub fn request(method: &str, path: &str, content_type: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `request` as it is and reads the answer: `(status, JSON body)` as [`call`].
///
/// # Panics
/// As [`call`].
pub async fn call_raw(addr: SocketAddr, request: &str) -> (u16, Value) {
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
    (status, value)
}

/// Calls the API and expects `status`; returns the body.
///
/// # Panics
/// When the status differs (the message shows the body), or as [`call`].
pub async fn expect(addr: SocketAddr, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let (got, value) = call(addr, method, path, body).await;
    assert_eq!(got, status, "{method} {path} answered {value}");
    value
}
