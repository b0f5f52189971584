//! Errors of the storage layer. HTTP handlers map them to responses (`http::error`); the
//! stream consumer retries the batch on them (nothing is acknowledged before it is stored).

/// A storage operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL refused or failed.
    #[error("failed to query PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("failed to get a PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Redis refused or failed.
    #[error("failed to query Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A row or entry that must exist does not.
    #[error("not found: {0}")]
    NotFound(String),
    /// A row that must not exist yet does.
    #[error("already exists: {0}")]
    Conflict(String),
    /// A request refused by a business rule (answered 409 with `code`, which a client acts on:
    /// `door_busy`, `unpaid_order`, `cabinet_offline`, ...).
    #[error("{code}: {detail}")]
    Rejected {
        /// Machine-readable reason.
        code: &'static str,
        /// Explanation.
        detail: String,
    },
    /// Input that breaks a rule, naming the field.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        detail: String,
    },
}

impl StoreError {
    /// `Invalid` for `field`.
    pub fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Invalid { field, detail: detail.into() }
    }

    /// `Rejected` with `code`.
    pub fn rejected(code: &'static str, detail: impl Into<String>) -> Self {
        StoreError::Rejected { code, detail: detail.into() }
    }

    /// Whether PostgreSQL reported a unique-key violation (a duplicate insert).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
    }
}
