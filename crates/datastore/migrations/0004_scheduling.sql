-- Version 4: scheduling. Per-cluster overcommit ratios and weigher, host
-- tags, each host's allocation kept beside its capacity (written in the same
-- transaction that places or removes a VM, so a claim is one guarded
-- UPDATE), server groups, each VM's placement constraints, and enrollment
-- tokens good for several hosts.

CREATE TABLE clusters (
    name TEXT PRIMARY KEY,
    -- Overcommit ratios in thousandths (4000 = 4.0): integers compare
    -- exactly in SQL on both backends.
    cpu_ratio_milli BIGINT NOT NULL,
    ram_ratio_milli BIGINT NOT NULL,
    disk_ratio_milli BIGINT NOT NULL,
    weigher TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

INSERT INTO clusters (name, cpu_ratio_milli, ram_ratio_milli, disk_ratio_milli, weigher, created_at, updated_at)
    SELECT DISTINCT cluster, 4000, 1000, 1000, 'spread', 0, 0 FROM hosts;

-- Sorted, comma-separated tag names ('' for none).
ALTER TABLE hosts ADD COLUMN tags TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN alloc_vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN alloc_memory_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN alloc_disk_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE hosts SET
    alloc_vcpus = (SELECT COALESCE(SUM(vcpus), 0) FROM vms WHERE vms.host_id = hosts.id),
    alloc_memory_bytes = (SELECT COALESCE(SUM(memory_bytes), 0) FROM vms WHERE vms.host_id = hosts.id),
    alloc_disk_bytes = (SELECT COALESCE(SUM(disk_bytes), 0) FROM vms WHERE vms.host_id = hosts.id);

ALTER TABLE host_enrollment_tokens ADD COLUMN max_uses BIGINT NOT NULL DEFAULT 1;
ALTER TABLE host_enrollment_tokens ADD COLUMN use_count BIGINT NOT NULL DEFAULT 0;
UPDATE host_enrollment_tokens SET use_count = 1 WHERE used_at IS NOT NULL;

CREATE TABLE server_groups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    policy TEXT NOT NULL,
    -- Bumped by every placement into the group: two controllers placing
    -- members at once cannot both pass the (anti-)affinity check.
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (project_id, name)
);

ALTER TABLE vms ADD COLUMN server_group_id TEXT REFERENCES server_groups(id);
-- The VM's placement constraints (JSON), kept for later moves.
ALTER TABLE vms ADD COLUMN placement TEXT;
CREATE INDEX vms_group ON vms (server_group_id, host_id);
CREATE INDEX vms_project_id ON vms (project_id, id);
