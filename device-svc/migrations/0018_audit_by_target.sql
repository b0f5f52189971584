-- The audit trail by target prefix (a device's last commands on its console page, `GET
-- /v1/audit?target=`): without it, finding a device's few rows among millions reads the trail
-- backwards until enough match.
CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log (target text_pattern_ops, id);
