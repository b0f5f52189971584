-- Vehicles: their life-cycle state, purpose and software version (what OTA validation reads),
-- activations by QR code, and OTA campaigns with their per-vehicle progress, reports, failures
-- and the operators' lists. Applied once, at start-up.

-- The life-cycle states of the OTA seed: assembled (总装下线), line_ok (OK下线), certified
-- (打印合格证), delivered (已交付), pending_activation (待激活), activated (已激活); scrapped
-- vehicles take no upgrades. `sw_version` NULL = not known (the seed's 00.000.000).
ALTER TABLE vehicles
    ADD COLUMN state text NOT NULL DEFAULT 'delivered'
        CHECK (state IN ('assembled', 'line_ok', 'certified', 'delivered', 'pending_activation', 'activated', 'scrapped')),
    ADD COLUMN purpose text NOT NULL DEFAULT 'sale' CHECK (purpose IN ('sale', 'test', 'internal')),
    ADD COLUMN sw_version text,
    ADD COLUMN owner_user_id text,
    ADD COLUMN activated_at timestamptz,
    ADD COLUMN activation_qr text;

-- One row per activation the cloud accepted: the record a repeated report is answered from
-- after the QR id's cache entry expired. The code is kept only as its SHA-256.
CREATE TABLE activations (
    qr_id          text PRIMARY KEY,
    vin            text NOT NULL REFERENCES vehicles ON DELETE CASCADE,
    user_id        text NOT NULL,
    seat           text NOT NULL,
    code_sha256    bytea NOT NULL,
    -- The vehicle was active already (through an earlier activation): nothing changed.
    already_active boolean NOT NULL,
    activated_at   timestamptz NOT NULL DEFAULT now()
);

-- Operators' lists that OTA validation consults.
CREATE TABLE ota_lists (
    list     text NOT NULL CHECK (list IN ('blacklist', 'same_version', 'downgrade')),
    vin      text NOT NULL,
    note     text NOT NULL DEFAULT '',
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (list, vin)
);

CREATE TABLE ota_tasks (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    version      text NOT NULL,
    upgrade_type text NOT NULL CHECK (upgrade_type IN ('silent', 'prompted', 'forced')),
    task_type    text NOT NULL CHECK (task_type IN ('test', 'factory', 'normal')),
    package      jsonb NOT NULL,
    start_at     timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'scheduled' CHECK (state IN ('scheduled', 'running', 'finished', 'cancelled')),
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    ended_at     timestamptz
);

-- The VINs validation refused, with the reason, in the order of the request.
CREATE TABLE ota_rejections (
    task_id  text NOT NULL REFERENCES ota_tasks ON DELETE CASCADE,
    position integer NOT NULL,
    vin      text NOT NULL,
    reason   text NOT NULL,
    detail   text NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, position)
);

-- One row per accepted vehicle of a task. `state` only moves forward (`rank` orders it);
-- `active` until a final state (success, failed, rolled_back, timed_out, cancelled); at most one
-- active upgrade per vehicle, enforced here even against two tasks created at once. `due_at` is
-- when an instance must look at the row next: the push (paced) while pending, the cancel
-- notice, or the silence deadline of the current phase; NULL while it waits for the vehicle to
-- connect.
CREATE TABLE ota_task_vehicles (
    task_id          text NOT NULL REFERENCES ota_tasks ON DELETE CASCADE,
    vin              text NOT NULL REFERENCES vehicles ON DELETE CASCADE,
    from_version     text,
    state            text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'notified', 'waiting', 'downloading', 'downloaded', 'verifying', 'upgrading',
                         'success', 'failed', 'rolled_back', 'timed_out', 'cancelled')),
    rank             smallint NOT NULL DEFAULT 0,
    active           boolean NOT NULL DEFAULT true,
    due_at           timestamptz,
    push_count       integer NOT NULL DEFAULT 0,
    pushed_at        timestamptz,
    push_message_id  text,
    cancel_sent      boolean NOT NULL DEFAULT true,
    download_percent smallint NOT NULL DEFAULT 0,
    bytes_done       bigint NOT NULL DEFAULT 0,
    upgrade_percent  smallint NOT NULL DEFAULT 0,
    ecu              text,
    ecu_percent      smallint,
    ecu_ts_ms        bigint NOT NULL DEFAULT 0,
    reported_version text,
    fail_ecu         text,
    fail_error       text,
    last_report      jsonb,
    last_report_at   timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, vin)
);
CREATE UNIQUE INDEX ota_one_active_upgrade ON ota_task_vehicles (vin) WHERE active;
CREATE INDEX ota_task_vehicles_due ON ota_task_vehicles (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX ota_task_vehicles_vin ON ota_task_vehicles (vin);

-- Every report a vehicle sent, as received. `entry` (the upstream stream entry) makes a
-- redelivered entry store nothing twice.
CREATE TABLE ota_reports (
    id          bigserial PRIMARY KEY,
    entry       text NOT NULL UNIQUE,
    task_id     text NOT NULL,
    vin         text NOT NULL,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    applied     text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ota_reports_task_vin ON ota_reports (task_id, vin, id);

-- Failed upgrades (failed, rolled back, timed out), one row per vehicle, task and status.
CREATE TABLE ota_failures (
    id          bigserial PRIMARY KEY,
    task_id     text NOT NULL REFERENCES ota_tasks ON DELETE CASCADE,
    vin         text NOT NULL,
    status      text NOT NULL,
    ecu         text,
    error       text,
    reported_ms bigint,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, vin, status)
);
