-- Operator console sessions: signed in with an operator or viewer API key, kept by a cookie.
-- Only the SHA-256 of the cookie's value is stored (a database read does not yield a usable
-- session); each session names its key, so revoking the key ends its sessions at once.
CREATE TABLE console_sessions (
    id_sha256  bytea PRIMARY KEY,
    key_id     text NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    csrf       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
