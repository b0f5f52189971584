-- Products, devices (cabinets and vehicles) with credentials and status history, cabinet
-- layout, and weight readings. Applied once, at start-up, by the device service.

CREATE TABLE products (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    unit_grams  integer NOT NULL CHECK (unit_grams > 0),
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every device, cabinet or vehicle, keyed as on the bus ('cab:ID', 'veh:VIN').
-- status_epoch is the session epoch of the newest event applied: an event with an older
-- epoch never changes the status (fencing against late or repeated session events).
CREATE TABLE devices (
    key               text PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('cab', 'veh')),
    status            text NOT NULL DEFAULT 'registered'
                      CHECK (status IN ('registered', 'pending_init', 'online', 'offline')),
    status_epoch      bigint NOT NULL DEFAULT 0,
    status_reason     text NOT NULL DEFAULT 'registered',
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    node              text,
    info              text,
    initialised       boolean NOT NULL DEFAULT false,
    enabled           boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_kind_status ON devices (kind, status);

-- What the gateways verify. A cabinet's HMAC key must be kept as is (an HMAC cannot be
-- checked against a hash); a vehicle's token is kept only as its SHA-256. Never logged.
CREATE TABLE device_credentials (
    device_key   text PRIMARY KEY REFERENCES devices (key) ON DELETE CASCADE,
    secret       bytea,
    token_sha256 bytea,
    generation   integer NOT NULL DEFAULT 1,
    rotated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((secret IS NULL) <> (token_sha256 IS NULL))
);

CREATE TABLE device_status_history (
    id          bigserial PRIMARY KEY,
    device_key  text NOT NULL REFERENCES devices (key) ON DELETE CASCADE,
    from_status text NOT NULL,
    to_status   text NOT NULL,
    reason      text NOT NULL,
    epoch       bigint NOT NULL,
    node        text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_status_history_device ON device_status_history (device_key, at DESC);

CREATE TABLE cabinets (
    id         text PRIMARY KEY,
    device_key text NOT NULL UNIQUE REFERENCES devices (key) ON DELETE CASCADE,
    name       text NOT NULL DEFAULT '',
    location   text NOT NULL DEFAULT ''
);

CREATE TABLE doors (
    cabinet_id text NOT NULL REFERENCES cabinets (id) ON DELETE CASCADE,
    door_id    smallint NOT NULL CHECK (door_id BETWEEN 1 AND 255),
    PRIMARY KEY (cabinet_id, door_id)
);

CREATE TABLE lanes (
    cabinet_id        text NOT NULL,
    door_id           smallint NOT NULL,
    lane_id           smallint NOT NULL CHECK (lane_id BETWEEN 1 AND 255),
    product_id        text REFERENCES products (id),
    restock_threshold integer NOT NULL DEFAULT 0 CHECK (restock_threshold >= 0),
    PRIMARY KEY (cabinet_id, door_id, lane_id),
    FOREIGN KEY (cabinet_id, door_id) REFERENCES doors ON DELETE CASCADE
);

CREATE TABLE vehicles (
    vin        text PRIMARY KEY,
    device_key text NOT NULL UNIQUE REFERENCES devices (key) ON DELETE CASCADE,
    model      text NOT NULL DEFAULT ''
);

-- The high-volume table: every reading of every lane. Partitioned by day on sample_time;
-- the device service creates partitions ahead and drops those past the retention period.
-- The primary key makes a redelivered report harmless and serves "a lane's readings in a
-- time range".
CREATE TABLE weight_readings (
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    lane_id     smallint NOT NULL,
    grams       integer NOT NULL,
    stable      boolean NOT NULL,
    sample_time timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (cabinet_id, door_id, lane_id, sample_time)
) PARTITION BY RANGE (sample_time);
-- Readings whose day has no partition (a cabinet clock far off) land here.
CREATE TABLE weight_readings_default PARTITION OF weight_readings DEFAULT;

-- Service-side faults noticed by the device service (a node's heartbeat intake below its
-- share), open while ended_at is null.
CREATE TABLE service_alerts (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    node       text NOT NULL,
    detail     text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz
);
CREATE UNIQUE INDEX service_alerts_open ON service_alerts (kind, node) WHERE ended_at IS NULL;
