-- The outbox relay claims rows for a lease instead of holding their locks while it talks to
-- Redis: a relay that freezes mid-batch holds nothing, and another instance takes its rows over
-- once the lease has run out.
ALTER TABLE outbox ADD COLUMN relay_until timestamptz;
