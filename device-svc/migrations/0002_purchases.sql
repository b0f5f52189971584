-- Purchases: orders and their state machine, settlements, the outbox relayed to Redis streams,
-- anomalies for operators, restocks and restock orders. Applied once, at start-up.

-- A lane may override its product's price (a price change takes the door's lock).
ALTER TABLE lanes ADD COLUMN price_cents bigint CHECK (price_cents >= 0);

-- One row per purchase. `state` moves only along the transitions of `purchases::state`, each
-- recorded in order_transitions in the same transaction. Active states hold the door's lock.
-- `due_at` is when an instance must next look at the order (authorisation deadline, opening
-- the door, the settlement wait); NULL while it waits for the cabinet.
CREATE TABLE orders (
    id              text PRIMARY KEY,
    user_id         text NOT NULL,
    cabinet_id      text NOT NULL REFERENCES cabinets (id),
    door_id         smallint NOT NULL,
    state           text NOT NULL CHECK (state IN ('created', 'authorised', 'door_opening', 'door_open',
                                                   'door_closed', 'settled', 'cancelled', 'abnormal')),
    door_state      text NOT NULL DEFAULT 'closed' CHECK (door_state IN ('closed', 'opening', 'open', 'abnormal')),
    reason          text,
    review          text[] NOT NULL DEFAULT '{}',
    lock_token      text NOT NULL,
    payment_id      text,
    goods           jsonb,
    open_attempts   integer NOT NULL DEFAULT 0,
    opened_ms       bigint,
    closed_ms       bigint,
    amount_cents    bigint,
    due_at          timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    authorised_at   timestamptz,
    door_open_at    timestamptz,
    door_closed_at  timestamptz,
    finished_at     timestamptz,
    FOREIGN KEY (cabinet_id, door_id) REFERENCES doors
);
-- A user with an order still running cannot start another (the "unpaid order" rule), and a
-- door has at most one running order even if its Redis lock were lost.
CREATE UNIQUE INDEX orders_user_active ON orders (user_id)
    WHERE state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed');
CREATE UNIQUE INDEX orders_door_active ON orders (cabinet_id, door_id)
    WHERE state IN ('created', 'authorised', 'door_opening', 'door_open', 'door_closed');
CREATE INDEX orders_due ON orders (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX orders_state ON orders (state);

CREATE TABLE order_transitions (
    id         bigserial PRIMARY KEY,
    order_id   text NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    from_state text,
    to_state   text NOT NULL,
    cause      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_transitions_order ON order_transitions (order_id, id);

-- What was charged, line by line. One per order, written with the order's move to settled.
CREATE TABLE settlements (
    order_id     text PRIMARY KEY REFERENCES orders (id),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    lines        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Messages for other services, written in the transaction that decided them and relayed to
-- Redis streams afterwards (at least once; `idem_key` lets a consumer drop a repeat).
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    stream       text NOT NULL,
    idem_key     text NOT NULL UNIQUE,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Things an operator must look at, with the goods snapshot. `source` makes recording one
-- idempotent (a redelivered event records nothing twice).
CREATE TABLE anomalies (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    source      text NOT NULL UNIQUE,
    order_id    text REFERENCES orders (id),
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    detail      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE INDEX anomalies_recent ON anomalies (created_at DESC);

-- An operator refilling a door: holds the door's lock from start to finish.
CREATE TABLE restocks (
    id          text PRIMARY KEY,
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    operator    text NOT NULL,
    lock_token  text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    FOREIGN KEY (cabinet_id, door_id) REFERENCES doors
);
CREATE UNIQUE INDEX restocks_active ON restocks (cabinet_id, door_id) WHERE finished_at IS NULL;

-- A lane that fell below its threshold: one open order per lane, closed by the next restock.
CREATE TABLE restock_orders (
    id          bigserial PRIMARY KEY,
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    lane_id     smallint NOT NULL,
    items_left  integer NOT NULL,
    threshold   integer NOT NULL,
    order_id    text REFERENCES orders (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz
);
CREATE UNIQUE INDEX restock_orders_open ON restock_orders (cabinet_id, door_id, lane_id) WHERE closed_at IS NULL;
