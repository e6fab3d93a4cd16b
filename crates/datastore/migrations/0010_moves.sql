-- Version 10: VMs moving between hosts (live and cold migration). While a
-- migration job holds a VM, its destination is claimed (host capacity and,
-- when the disk changes pool, the pool's) and recorded here; the job's
-- last step moves the VM (host, pool) and releases the source in one
-- transaction, or its undo releases the destination.

-- The host the VM is moving to; NULL when it is not moving.
ALTER TABLE vms ADD COLUMN migration_target TEXT REFERENCES hosts(id);
-- The pool its disk will be in there (NULL: that host's local pool).
ALTER TABLE vms ADD COLUMN migration_pool TEXT REFERENCES storage_pools(id);

-- A host's own words on a request's progress (a migration's phase, dirty
-- rate and expected downtime), shown as the job's message.
ALTER TABLE host_requests ADD COLUMN progress_message TEXT;

-- A migrated VM's console continues on its new host from byte 0 of that
-- host's log: the first output from there is appended after what is kept
-- (rebase = 1 until then), and shift maps that host's offsets onto the
-- stored stream's.
ALTER TABLE vm_consoles ADD COLUMN shift BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vm_consoles ADD COLUMN rebase BIGINT NOT NULL DEFAULT 0;
