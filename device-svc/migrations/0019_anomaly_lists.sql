-- The anomaly list (GET /v1/anomalies, the console): newest first, alone (the primary key) or
-- by order, cabinet, kind, or still open; each index ends in the list's order.
CREATE INDEX IF NOT EXISTS anomalies_order ON anomalies (order_id, id DESC);
CREATE INDEX IF NOT EXISTS anomalies_cabinet ON anomalies (cabinet_id, id DESC);
CREATE INDEX IF NOT EXISTS anomalies_kind ON anomalies (kind, id DESC);
CREATE INDEX IF NOT EXISTS anomalies_open ON anomalies (id DESC) WHERE resolved_at IS NULL;
