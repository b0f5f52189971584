-- The devices a node holds, for the node-lost sweep (a node gone for good: its devices are
-- marked offline after heartbeat.node_lost_s).
CREATE INDEX devices_node_live ON devices (node) WHERE status IN ('online', 'pending_init');
