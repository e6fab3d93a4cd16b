-- Version 9: shared storage pools. A pool is one directory several hosts
-- mount at the same path; VMs created in it keep their disks there. Every
-- host's own data directory is the implicit `local` pool (its capacity is
-- the host's disk_bytes), so it has no row.

CREATE TABLE storage_pools (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    -- The file system's size and free space, as last reported by a host
    -- that sees the pool (0 until one has).
    capacity_bytes BIGINT NOT NULL DEFAULT 0,
    available_bytes BIGINT NOT NULL DEFAULT 0,
    -- The disks of the VMs in the pool: claimed in the create transaction
    -- (never beyond capacity_bytes), released when the VM is removed.
    alloc_bytes BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- What each host found when it checked each pool.
CREATE TABLE host_pools (
    host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    pool_id TEXT NOT NULL REFERENCES storage_pools(id) ON DELETE CASCADE,
    -- NULL: the host sees the pool and can write to it.
    error TEXT,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (host_id, pool_id)
);

-- The names of the pools a host sees, for the scheduler's index (like tags).
ALTER TABLE hosts ADD COLUMN pools TEXT NOT NULL DEFAULT '';
-- The VM's shared pool; NULL: the host's local pool.
ALTER TABLE vms ADD COLUMN pool_id TEXT REFERENCES storage_pools(id);
