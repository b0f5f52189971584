-- The user a vehicle was sold to (seed 004: the QR content binds the car to its buyer). Only
-- that user may scan the car's activation QR id; set by the sales side through the operator
-- API at registration or later.
ALTER TABLE vehicles ADD COLUMN buyer_user_id text;
