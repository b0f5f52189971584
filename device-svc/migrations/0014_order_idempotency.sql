-- A shop's retry of an order it may not have seen created (its answer lost, or a 503 that came
-- after the commit) must get that order back, not a refusal naming the user's own order as
-- running. The shop names each creation with a key of its own; one order per tenant and key.
ALTER TABLE orders ADD COLUMN idempotency_key text;
CREATE UNIQUE INDEX orders_idempotency_key ON orders (coalesce(tenant, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
