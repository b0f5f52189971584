//! Console sessions: an operator or viewer signs in with their API key once; the browser then
//! holds a random session id in a cookie that scripts cannot read (`HttpOnly`), that other
//! sites' pages do not send (`SameSite=Strict`), and that travels only over TLS when the API
//! is served over TLS (`Secure`). PostgreSQL keeps the id's SHA-256, the key it belongs to, its
//! expiry and its CSRF token, so any instance serves any session and revoking the key ends its
//! sessions at the next request. Every form carries the CSRF token; a change without it is
//! refused (403) even from a page of this origin.

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::auth::{Principal, Role};
use crate::error::StoreError;

/// The cookie's name.
pub(super) const COOKIE: &str = "console";
/// How long a session lasts without signing in again.
const TTL_S: i64 = 8 * 3600;

/// A signed-in operator or viewer.
#[derive(Debug, Clone)]
pub(super) struct Session {
    /// The key the session was opened with.
    pub(super) principal: Principal,
    /// The token every form of this session carries.
    pub(super) csrf: String,
}

impl Session {
    /// Whether the session may change things (operators); viewers only read.
    pub(super) fn may_act(&self) -> bool {
        self.principal.role == Role::Operator
    }

    /// Whether `token` is this session's CSRF token (compared in constant time).
    pub(super) fn csrf_ok(&self, token: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes()))
    }
}

fn hash(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

fn random_hex(n: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| StoreError::invalid("random", e.to_string()))?;
    Ok(hex::encode(buf))
}

/// Opens a session for `principal` (an operator or viewer key just verified); returns the
/// `Set-Cookie` value.
///
/// # Errors
/// Storage errors.
pub(super) async fn open(app: &App, principal: &Principal) -> Result<String, StoreError> {
    let id = random_hex(32)?;
    let csrf = random_hex(32)?;
    let client = app.pg.get().await?;
    client
        .execute(
            "INSERT INTO console_sessions (id_sha256, key_id, csrf, expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
            &[&hash(&id), &principal.key_id, &csrf, &(TTL_S as f64)],
        )
        .await?;
    // Sessions past their expiry are removed as new ones open (bounded: the index on expiry).
    client
        .execute(
            "DELETE FROM console_sessions WHERE id_sha256 IN
               (SELECT id_sha256 FROM console_sessions WHERE expires_at < now() LIMIT 100)",
            &[],
        )
        .await?;
    Ok(cookie(app, &id, TTL_S))
}

fn cookie(app: &App, value: &str, max_age: i64) -> String {
    let secure = if app.config.http.tls_cert.is_empty() { "" } else { "; Secure" };
    format!("{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// The `Set-Cookie` value that removes the cookie.
pub(super) fn cleared(app: &App) -> HeaderValue {
    HeaderValue::from_str(&cookie(app, "", 0)).unwrap_or(HeaderValue::from_static("console=; Max-Age=0"))
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The session the request's cookie names, if it is open, unexpired, and its key is neither
/// revoked nor of another role than operator or viewer.
///
/// # Errors
/// Storage errors.
pub(super) async fn current(app: &App, headers: &HeaderMap) -> Result<Option<Session>, StoreError> {
    let Some(id) = cookie_value(headers) else { return Ok(None) };
    let client = app.pg.get().await?;
    let row = client
        .query_opt(
            "SELECT k.id, k.name, k.role, s.csrf FROM console_sessions s JOIN api_keys k ON k.id = s.key_id
              WHERE s.id_sha256 = $1 AND s.expires_at > now() AND k.revoked_at IS NULL",
            &[&hash(id)],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let role: Role = match row.get::<_, String>(2).parse() {
        Ok(r @ (Role::Operator | Role::Viewer)) => r,
        _ => return Ok(None),
    };
    Ok(Some(Session {
        principal: Principal { key_id: row.get(0), name: row.get(1), role, tenant: None },
        csrf: row.get(3),
    }))
}

/// Ends the request's session.
///
/// # Errors
/// Storage errors.
pub(super) async fn close(app: &App, headers: &HeaderMap) -> Result<(), StoreError> {
    if let Some(id) = cookie_value(headers) {
        let client = app.pg.get().await?;
        client.execute("DELETE FROM console_sessions WHERE id_sha256 = $1", &[&hash(id)]).await?;
    }
    Ok(())
}
