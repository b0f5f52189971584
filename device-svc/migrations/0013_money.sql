-- The money loop closed (seed documents 002 and 003): every message that moves money to or
-- from a shopper's account (the settlement, an operator's refund or extra charge) is a row
-- here with its own idempotency key, sent through the outbox and answered by the account
-- service (`paid`, or `failed` with a reason). An order's `payment` is derived from its rows
-- in the transaction that records a result, so what a shop sees and what the account side
-- said cannot disagree.
CREATE TABLE payments (
    idem_key     text PRIMARY KEY,
    order_id     text NOT NULL REFERENCES orders (id),
    -- `void`: tells the account side to stop retrying a failed charge an operator waived.
    kind         text NOT NULL CHECK (kind IN ('settlement', 'refund', 'charge', 'void')),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    lines        jsonb NOT NULL DEFAULT '[]',
    reason       text,
    operator     text,
    -- pending until the account service answers; `paid` is final; `failed` may still become
    -- `paid` (the account side retries a transient failure); `waived` is an operator's
    -- decision about a failed charge (paid another way, or written off).
    result       text NOT NULL DEFAULT 'pending' CHECK (result IN ('pending', 'paid', 'failed', 'waived')),
    failure      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    result_at    timestamptz
);
CREATE INDEX payments_order ON payments (order_id, created_at);
CREATE INDEX payments_open ON payments (created_at) WHERE result IN ('pending', 'failed');

-- `payment`: NULL until settled; then pending / paid / unpaid (a charge failed) / waived (an
-- operator decided about the failed charge) / refunded (everything charged went back). The
-- sums count answered rows only.
ALTER TABLE orders ADD COLUMN payment text
    CHECK (payment IN ('pending', 'paid', 'unpaid', 'waived', 'refunded'));
ALTER TABLE orders ADD COLUMN charged_cents bigint NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN refunded_cents bigint NOT NULL DEFAULT 0;
-- The "no unpaid order" rule (seed 003) looks a user's unpaid orders up on every new order.
CREATE INDEX orders_unpaid ON orders (coalesce(tenant, ''), user_id) WHERE payment = 'unpaid';

-- Settlements recorded before this migration: their row, paid if the account service
-- confirmed them already.
INSERT INTO payments (idem_key, order_id, kind, amount_cents, lines, result, result_at)
SELECT 'settlement:' || s.order_id, s.order_id, 'settlement', s.amount_cents, s.lines,
       CASE WHEN o.confirmed_at IS NOT NULL THEN 'paid' ELSE 'pending' END, o.confirmed_at
  FROM settlements s LEFT JOIN outbox o ON o.idem_key = 'settlement:' || s.order_id
ON CONFLICT DO NOTHING;
UPDATE orders o SET payment = CASE WHEN p.result = 'paid' THEN 'paid' ELSE 'pending' END,
                    charged_cents = CASE WHEN p.result = 'paid' THEN p.amount_cents ELSE 0 END
  FROM payments p WHERE p.order_id = o.id AND p.kind = 'settlement';

-- Password-free deduction contracts (seed 002), mirrored from the provider's signed
-- callbacks: a user without a `signed` contract cannot start a purchase. `event_ms` orders the
-- events: an older event than the one applied changes nothing.
CREATE TABLE deduction_contracts (
    tenant      text NOT NULL,
    user_id     text NOT NULL,
    contract_id text NOT NULL,
    state       text NOT NULL CHECK (state IN ('signed', 'suspended', 'terminated')),
    provider    text NOT NULL,
    event_ms    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, user_id)
);

-- Problem 3 of seed 003 (an item swapped for one of the same weight) is found at restock: the
-- restocker reports what each lane held when the door was opened (`found`) and after refilling
-- (`stocked`); `expected` is what the previous count and the charges since say it should hold.
CREATE TABLE lane_counts (
    restock_id  text NOT NULL REFERENCES restocks (id),
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    lane_id     smallint NOT NULL,
    found       integer NOT NULL CHECK (found >= 0),
    stocked     integer NOT NULL CHECK (stocked >= 0),
    expected    integer,
    counted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (restock_id, lane_id)
);
CREATE INDEX lane_counts_lane ON lane_counts (cabinet_id, door_id, lane_id, counted_at DESC);
-- The scale check after a restock: the lane's first stable weight after the count, against
-- `stocked` x the unit weight; a drift gets a TARE command and a calibration notice.
ALTER TABLE lane_counts ADD COLUMN unit_grams integer NOT NULL DEFAULT 0;
ALTER TABLE lane_counts ADD COLUMN product_id text;
ALTER TABLE lane_counts ADD COLUMN scale_grams integer;
ALTER TABLE lane_counts ADD COLUMN scale_checked_at timestamptz;
CREATE INDEX lane_counts_unchecked ON lane_counts (cabinet_id) WHERE scale_checked_at IS NULL;
