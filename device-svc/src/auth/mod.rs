//! Who may call the API. Every caller but the payment provider presents an API key
//! (`Authorization: Bearer iotk_<id>_<secret>`) that carries one role; the route table in
//! [`crate::http`] says which roles may call each route, and a `shop` key also names the
//! tenant whose orders it may create and read. The payment provider is authenticated by the
//! HMAC signature of its callback instead (`protocol::payment`).
//!
//! Why API keys: the callers are a handful of backends (the shopping app, the owner app),
//! operators' tools and a scraper, not people in browsers; a bearer key per caller is what such
//! services expect (GitHub, Stripe and Hono use the same shape), needs no identity provider to
//! run, and is revoked by one row. Keys are 256-bit random secrets, so SHA-256 of the secret is
//! enough to store (a slow password hash protects guessable secrets; these are not), and the
//! whole key is shown once, when it is created (`device-svc keys create`, or `POST /v1/keys`).
//!
//! - [`keys`]: the key format, creation, listing, revocation, and the verifier with its cache;
//! - [`audit`]: the audit trail, written in the transaction of each change.

pub mod audit;
pub mod keys;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// What a key may do: each route lists the roles that may call it (docs/api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Registry, credentials, commands, prices, OTA, lists, order administration, keys, audit.
    Operator,
    /// Reads what operators read; changes nothing.
    Viewer,
    /// The shopping app's backend: creates and reads its own tenant's orders.
    Shop,
    /// The owner app's backend: activation (scan, confirm, cancel) for the user it names.
    OwnerApp,
    /// A metrics scraper: `/metrics` only.
    Metrics,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [Role::Operator, Role::Viewer, Role::Shop, Role::OwnerApp, Role::Metrics];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Shop => "shop",
            Role::OwnerApp => "owner_app",
            Role::Metrics => "metrics",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?}: operator, viewer, shop, owner_app or metrics"))
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (the public half of the key; what the audit trail names).
    pub key_id: String,
    /// The key's name, as its creator gave it.
    pub name: String,
    /// The key's role.
    pub role: Role,
    /// For `shop` keys: the tenant whose orders the key creates and reads.
    pub tenant: Option<String>,
}

impl Principal {
    /// How the audit trail names this caller: `key:<id>`.
    pub fn audit_name(&self) -> String {
        format!("key:{}", self.key_id)
    }
}
