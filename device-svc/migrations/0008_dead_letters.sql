-- Upstream entries that cannot be applied (PostgreSQL refuses what they carry) are set aside
-- here with the error, so their shard moves on; an operator lists them and replays one once the
-- cause is fixed. The fields are kept byte for byte (names and values in order).
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    stream      text NOT NULL,
    entry_id    text NOT NULL,
    kind        text NOT NULL,
    names       text[] NOT NULL,
    vals        bytea[] NOT NULL,
    error       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    UNIQUE (stream, entry_id)
);
CREATE INDEX dead_letters_open ON dead_letters (id) WHERE replayed_at IS NULL;
