-- Retention sweeps delete operational logs by age, oldest first, in small batches: each needs
-- its age column indexed, or every batch would scan the whole table.
CREATE INDEX device_status_history_at ON device_status_history (at);
CREATE INDEX ota_reports_received_at ON ota_reports (received_at);
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
