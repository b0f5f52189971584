-- The reason an operator gave for a change that takes one (cancel or force-close an order, a
-- refund, a charge, a waiver, opening a door): kept with the change's audit row, so the trail
-- says why as well as who, what and when.
ALTER TABLE audit_log ADD COLUMN reason text;
