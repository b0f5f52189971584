-- A door whose order never saw it close is taken out of sale (why, in this column) until an
-- operator has been there: finishing a restock of the door puts it back.
ALTER TABLE doors ADD COLUMN out_of_sale text;
