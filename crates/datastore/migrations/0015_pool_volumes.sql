-- Version 15: volumes in shared storage pools. A pool volume's file is
-- `<pool>/volumes/<id>.qcow2`, so any host that sees the pool can attach it;
-- its size is claimed against the pool's capacity (storage_pools.alloc_bytes)
-- when it is created and given back when it is deleted. NULL: the volume
-- lives in the data directory of the host it is first attached on.
ALTER TABLE volumes ADD COLUMN pool_id TEXT REFERENCES storage_pools(id);
CREATE INDEX volumes_pool ON volumes (pool_id);
