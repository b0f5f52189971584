-- The operators' lists (GET /v1/devices, /v1/cabinets, /v1/vehicles, /v1/orders): each filter
-- alone is an index condition and each index ends in the list's order, so a page is read in
-- index order and stops after its rows, at 100,000 devices and 10 million orders alike
-- (tests/lists.rs checks the plans; BENCHMARKS.md has the timings).
--
-- Ids are listed and searched by prefix byte by byte (COLLATE "C"): one index then gives both
-- the order and the prefix range.
--
-- On a large existing table, create these by hand with CREATE INDEX CONCURRENTLY before
-- upgrading: the statements below then find them and do nothing.

-- Devices: by key, status (a kind is a filter on these: it keeps about half of the rows),
-- node, last change; the few disabled ones.
DROP INDEX IF EXISTS devices_kind_status;
CREATE INDEX IF NOT EXISTS devices_key_c ON devices ((key COLLATE "C"));
CREATE INDEX IF NOT EXISTS devices_status_key ON devices (status, (key COLLATE "C"));
CREATE INDEX IF NOT EXISTS devices_node_key ON devices (node, (key COLLATE "C"));
CREATE INDEX IF NOT EXISTS devices_changed ON devices (status_changed_at DESC, (key COLLATE "C") DESC);
CREATE INDEX IF NOT EXISTS devices_status_changed
    ON devices (status, status_changed_at DESC, (key COLLATE "C") DESC);
-- enabled=true matches nearly every row: the key order with a filter fills a page at once.
CREATE INDEX IF NOT EXISTS devices_disabled ON devices ((key COLLATE "C")) WHERE NOT enabled;

-- Cabinets by id; vehicles by VIN, state, software version, owner.
CREATE INDEX IF NOT EXISTS cabinets_id_c ON cabinets ((id COLLATE "C"));
CREATE INDEX IF NOT EXISTS vehicles_vin_c ON vehicles ((vin COLLATE "C"));
CREATE INDEX IF NOT EXISTS vehicles_state_vin ON vehicles (state, (vin COLLATE "C"));
CREATE INDEX IF NOT EXISTS vehicles_version_vin ON vehicles (sw_version, (vin COLLATE "C"));
CREATE INDEX IF NOT EXISTS vehicles_owner_vin ON vehicles (owner_user_id, (vin COLLATE "C"));

-- Orders, newest first: alone, by state, cabinet, user, payment, and the review queue.
DROP INDEX IF EXISTS orders_state;
CREATE INDEX IF NOT EXISTS orders_created ON orders (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_state_created ON orders (state, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_cabinet_created ON orders (cabinet_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_user_created ON orders (user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_payment_created ON orders (payment, created_at DESC, id DESC)
    WHERE payment IS NOT NULL;
CREATE INDEX IF NOT EXISTS orders_to_review ON orders (created_at DESC, id DESC)
    WHERE (review <> '{}' OR state = 'abnormal');
