-- A vehicle has nothing to initialise: it is online while it holds a session (status.rs).
-- Vehicles registered before this migration get the same footing; new ones are registered so.
UPDATE devices SET initialised = true, status = 'online' WHERE kind = 'veh' AND status = 'pending_init';
UPDATE devices SET initialised = true WHERE kind = 'veh';
