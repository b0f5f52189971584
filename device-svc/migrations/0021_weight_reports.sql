-- Weight readings stored one row per report (one door's lanes read at one time) instead of one
-- row per lane. A 4-lane report was four tuples and four primary-key entries; it is now one of
-- each, which is what lets one instance store 50,000 readings a second (BENCHMARKS.md,
-- "Weight readings end to end"). The lanes are three arrays in the report's lane order.
--
-- The key names the report: the same report delivered again (a redelivered stream entry, a
-- cabinet resending it) is the same key and is stored once; two reports of one door at one
-- sample time with different lanes (a door of more than 64 lanes, SPEC.md 1.7) are two rows.
CREATE TABLE weight_reports (
    cabinet_id  text NOT NULL,
    door_id     smallint NOT NULL,
    sample_time timestamptz NOT NULL,
    lane_ids    smallint[] NOT NULL,
    grams       integer[] NOT NULL,
    stable      boolean[] NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (cabinet_id, door_id, sample_time, lane_ids),
    CHECK (cardinality(lane_ids) >= 1 AND cardinality(grams) = cardinality(lane_ids)
           AND cardinality(stable) = cardinality(lane_ids))
) PARTITION BY RANGE (sample_time);
CREATE TABLE weight_reports_default PARTITION OF weight_reports DEFAULT;

-- The day partitions of the old table, with the same bounds under the new name.
DO $$
DECLARE part record;
BEGIN
    FOR part IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.relname = 'weight_readings' AND c.relname ~ '^weight_readings_d[0-9]+$'
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF weight_reports %s',
                       replace(part.relname, 'weight_readings_d', 'weight_reports_d'), part.bound);
    END LOOP;
END $$;

-- The readings stored so far, one row per door and sample time.
INSERT INTO weight_reports (cabinet_id, door_id, sample_time, lane_ids, grams, stable, received_at)
SELECT cabinet_id, door_id, sample_time, array_agg(lane_id ORDER BY lane_id),
       array_agg(grams ORDER BY lane_id), array_agg(stable ORDER BY lane_id), min(received_at)
  FROM weight_readings
 GROUP BY cabinet_id, door_id, sample_time;

DROP TABLE weight_readings;

-- One row per lane reading, as before, for queries and for people reading the database.
CREATE VIEW weight_readings AS
SELECT r.cabinet_id, r.door_id, l.lane_id, l.grams, l.stable, r.sample_time, r.received_at
  FROM weight_reports r
 CROSS JOIN LATERAL unnest(r.lane_ids, r.grams, r.stable) AS l (lane_id, grams, stable);
