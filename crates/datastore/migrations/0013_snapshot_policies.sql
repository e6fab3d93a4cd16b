-- Version 13: snapshot policies. A policy takes a snapshot of its VM at most
-- every `every_secs` and keeps the newest `keep` of the snapshots it took,
-- merging older ones away (the chain stays bounded by itself). Snapshots
-- record who took them: 'operator' or 'policy'; a policy only ever deletes
-- its own.
ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT 'operator';

CREATE TABLE snapshot_policies (
    vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    project_id TEXT NOT NULL REFERENCES projects(id),
    -- A snapshot at most this often (NULL: no schedule; `policy run` only).
    every_secs BIGINT,
    -- The policy's snapshots kept, newest first (at least 1).
    keep BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
