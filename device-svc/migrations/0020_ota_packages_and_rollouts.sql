-- OTA packages stored by the platform (encrypted, signed, served to vehicles by range), full or
-- delta, and rollouts in waves with thresholds, automatic pauses and re-pushes.

-- A package as uploaded: `uploading` until its bytes are stored and its digest checked, then
-- `ready`. The data key is kept only wrapped by a master key (`wrapped_key`: master id, nonce,
-- sealed key); `nonce_prefix` and `chunk_bytes` rebuild the chunk cipher. A delta applies to
-- `from_version` only.
CREATE TABLE ota_packages (
    id           text PRIMARY KEY,
    version      text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('full', 'delta')),
    from_version text,
    state        text NOT NULL DEFAULT 'uploading' CHECK (state IN ('uploading', 'ready')),
    size_bytes   bigint NOT NULL DEFAULT 0,
    sha256       text NOT NULL DEFAULT '',
    signature    text NOT NULL DEFAULT '',
    public_key   text NOT NULL DEFAULT '',
    object       text NOT NULL,
    wrapped_key  jsonb NOT NULL,
    nonce_prefix bytea NOT NULL,
    chunk_bytes  integer NOT NULL,
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'delta') = (from_version IS NOT NULL))
);
-- At most one ready delta from a version to a version: the push's choice is never ambiguous.
CREATE UNIQUE INDEX ota_packages_one_delta ON ota_packages (version, from_version)
    WHERE kind = 'delta' AND state = 'ready';

-- A task may install a stored package (`package_id`, the full one; deltas to its version are
-- found by version). Waves: cumulative percentages of the accepted vehicles (`{5,50,100}`: a
-- 5 % canary, then up to half, then all); `current_wave` is the last released one. A wave is
-- followed by the next once `success_threshold` % of it succeeded or none of it is still
-- running; the task pauses itself when more than `error_threshold` % of a released wave
-- failed (`paused_reason` = 'error_threshold'). A resume accepts the failures of the waves up
-- to `accepted_wave` and releases the next.
ALTER TABLE ota_tasks
    ADD COLUMN package_id        text REFERENCES ota_packages,
    ADD COLUMN waves             smallint[] NOT NULL DEFAULT '{100}',
    ADD COLUMN success_threshold smallint NOT NULL DEFAULT 100 CHECK (success_threshold BETWEEN 0 AND 100),
    ADD COLUMN error_threshold   smallint NOT NULL DEFAULT 100 CHECK (error_threshold BETWEEN 0 AND 100),
    ADD COLUMN current_wave      smallint NOT NULL DEFAULT 0,
    ADD COLUMN accepted_wave     smallint NOT NULL DEFAULT -1,
    ADD COLUMN paused_reason     text,
    DROP CONSTRAINT ota_tasks_state_check,
    ADD CONSTRAINT ota_tasks_state_check CHECK (state IN ('scheduled', 'running', 'paused', 'finished', 'cancelled'));

-- Each vehicle's wave, its attempt (raised by each re-push after a failure) and the package
-- chosen for it at the push (a delta from its version, or the full one).
ALTER TABLE ota_task_vehicles
    ADD COLUMN wave       smallint NOT NULL DEFAULT 0,
    ADD COLUMN attempt    smallint NOT NULL DEFAULT 1,
    ADD COLUMN package_id text;

-- A failure per vehicle, task, status and attempt.
ALTER TABLE ota_failures
    ADD COLUMN attempt smallint NOT NULL DEFAULT 1,
    DROP CONSTRAINT ota_failures_task_id_vin_status_key,
    ADD CONSTRAINT ota_failures_once UNIQUE (task_id, vin, status, attempt);
