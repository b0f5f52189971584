-- A settlement is delivered only when the account service confirms it (P account:confirmations),
-- not when it was written to Redis: a Redis that loses data must not lose a charge. Until then
-- the relay sends it again. `done_at` is when a row needs keeping no longer (published, for
-- messages nobody confirms; confirmed, for settlements): retention counts from it.
ALTER TABLE outbox ADD COLUMN confirmed_at timestamptz;
ALTER TABLE outbox ADD COLUMN sends integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN done_at timestamptz;
UPDATE outbox SET done_at = published_at, sends = 1 WHERE published_at IS NOT NULL;
DROP INDEX outbox_published_at;
CREATE INDEX outbox_done_at ON outbox (done_at) WHERE done_at IS NOT NULL;
CREATE INDEX outbox_unconfirmed ON outbox (published_at) WHERE done_at IS NULL AND published_at IS NOT NULL;
