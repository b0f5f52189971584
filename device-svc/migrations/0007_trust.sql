-- The API's trust boundary: who may call (API keys with a role, stored only as a hash), what
-- they did (the audit trail, written in the transaction of the change), and the payment
-- provider's signed callbacks (each signature accepted once; the authorised amount checked
-- against the order's hold).

-- An API key is `iotk_<id>_<secret>`; only SHA-256(secret) is kept. A `shop` key names the
-- tenant whose orders it may create and read; other roles have none.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('operator', 'viewer', 'shop', 'owner_app', 'metrics')),
    tenant       text,
    secret_hash  bytea NOT NULL,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CHECK ((role = 'shop') = (tenant IS NOT NULL))
);

-- One row per call that changed something or was refused to an authenticated caller. Written
-- in the same transaction as the change, so a change without its row (or the reverse) cannot
-- be committed. Never holds a secret: the target is the request path, bodies are not kept.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    request_id  text NOT NULL,
    principal   text NOT NULL,
    role        text NOT NULL,
    method      text NOT NULL,
    route       text NOT NULL,
    target      text NOT NULL,
    outcome     text NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal ON audit_log (principal, id);

-- Orders: the tenant (shop) that created it, and the amount the payment provider must
-- authorise (the hold; the charge is known only after the door closes and is at most this).
ALTER TABLE orders ADD COLUMN tenant text;
ALTER TABLE orders ADD COLUMN hold_cents bigint NOT NULL DEFAULT 0 CHECK (hold_cents >= 0);
ALTER TABLE orders ADD COLUMN currency text NOT NULL DEFAULT 'CNY';
-- A user id is the shop's own: the "one unfinished order per user" rule holds per tenant, so
-- two shops' users with the same id do not block each other.
DROP INDEX orders_user_active;
CREATE UNIQUE INDEX orders_user_active ON orders (coalesce(tenant, ''), user_id)
    WHERE state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed');

-- Each accepted callback signature, so the same signed request is refused when replayed.
CREATE TABLE payment_callbacks (
    id          bigserial PRIMARY KEY,
    provider    text NOT NULL,
    signature   bytea NOT NULL,
    order_id    text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, signature)
);
CREATE INDEX payment_callbacks_received ON payment_callbacks (received_at);
