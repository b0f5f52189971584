//! PostgreSQL: the connection pool and the migrations in `migrations/`, applied at start-up.
//!
//! Migrations are compiled in, applied in order, each in its own transaction, under an
//! advisory lock so that several instances starting together apply each exactly once.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::error::StoreError;

/// Every migration, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "registry_status_weights", include_str!("../migrations/0001_registry_status_weights.sql")),
    (2, "purchases", include_str!("../migrations/0002_purchases.sql")),
    (3, "vehicles", include_str!("../migrations/0003_vehicles.sql")),
    (4, "retention", include_str!("../migrations/0004_retention.sql")),
    (5, "vehicle_status", include_str!("../migrations/0005_vehicle_status.sql")),
    (6, "vehicle_buyer", include_str!("../migrations/0006_vehicle_buyer.sql")),
    (7, "trust", include_str!("../migrations/0007_trust.sql")),
    (8, "dead_letters", include_str!("../migrations/0008_dead_letters.sql")),
    (9, "outbox_lease", include_str!("../migrations/0009_outbox_lease.sql")),
    (10, "door_out_of_sale", include_str!("../migrations/0010_door_out_of_sale.sql")),
    (11, "devices_by_node", include_str!("../migrations/0011_devices_by_node.sql")),
    (12, "outbox_confirmed", include_str!("../migrations/0012_outbox_confirmed.sql")),
    (13, "money", include_str!("../migrations/0013_money.sql")),
    (14, "order_idempotency", include_str!("../migrations/0014_order_idempotency.sql")),
    (15, "list_indexes", include_str!("../migrations/0015_list_indexes.sql")),
    (16, "audit_reason", include_str!("../migrations/0016_audit_reason.sql")),
    (17, "console_sessions", include_str!("../migrations/0017_console_sessions.sql")),
    (18, "audit_by_target", include_str!("../migrations/0018_audit_by_target.sql")),
    (19, "anomaly_lists", include_str!("../migrations/0019_anomaly_lists.sql")),
    (20, "ota_packages_and_rollouts", include_str!("../migrations/0020_ota_packages_and_rollouts.sql")),
    (21, "weight_reports", include_str!("../migrations/0021_weight_reports.sql")),
];

/// Longest wait for a pooled connection.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An arbitrary constant naming the migrations' advisory lock.
const MIGRATION_LOCK: i64 = 0x1070_6777_0001;

/// Opens a pool of `postgres.pool_size` connections to `postgres.url`, every session with the
/// server-side timeouts of `[postgres]` (idle in transaction, lock wait, statement).
///
/// # Errors
/// An invalid URL or pool configuration.
pub fn pool(cfg: &crate::config::PostgresConfig) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config = cfg.url.parse()?;
    let options = format!(
        "{} -c idle_in_transaction_session_timeout={} -c lock_timeout={} -c statement_timeout={}",
        config.get_options().unwrap_or_default(),
        cfg.idle_in_transaction_timeout_ms,
        cfg.lock_timeout_ms,
        cfg.statement_timeout_ms
    );
    config.options(options.trim_start());
    let size = cfg.pool_size;
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    // A bounded wait: a pool that stays exhausted answers 503 instead of hanging requests.
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .build()
        .map_err(|e| StoreError::invalid("postgres.url", e.to_string()))
}

/// How many migrations this build carries (its schema version).
pub const MIGRATION_COUNT: usize = MIGRATIONS.len();

/// Applies the migrations not yet applied. Returns how many were.
///
/// # Errors
/// Any PostgreSQL error; a failed migration is rolled back.
pub async fn migrate(pool: &Pool) -> Result<usize, StoreError> {
    migrate_to(pool, i32::MAX).await
}

/// Applies the migrations not yet applied up to version `last`: how a test builds the schema
/// of an earlier release to check an upgrade. Returns how many were applied.
///
/// # Errors
/// Any PostgreSQL error; a failed migration is rolled back.
pub async fn migrate_to(pool: &Pool, last: i32) -> Result<usize, StoreError> {
    let mut client = pool.get().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v <= last) {
        let tx = client.transaction().await?;
        // A migration may rewrite a large table, and waits for another instance's: no limits.
        tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0").await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        let done = tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version]).await?.is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
            applied += 1;
            tracing::info!(version, name, "migration applied");
        }
        tx.commit().await?;
    }
    Ok(applied)
}
