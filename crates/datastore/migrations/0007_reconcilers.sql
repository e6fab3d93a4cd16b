-- Version 7: reconcilers. Leader leases (cluster-wide background work runs
-- on one controller at a time), each VM's restart policy with the record of
-- its automatic restarts (crash-loop protection), and the orphan VMs hosts
-- report (VMs a host runs that the controller does not place there).

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    -- The controller holding it (its controller id).
    holder TEXT NOT NULL,
    -- Micros since the epoch; past it, anyone may take the lease.
    expires_at BIGINT NOT NULL
);

-- `never` or `on_crash`.
ALTER TABLE vms ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never';
-- Automatic restarts since `auto_restart_window_at` (the first of them).
ALTER TABLE vms ADD COLUMN auto_restarts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN auto_restart_window_at BIGINT;
-- Set when automatic restarts were given up (too many crashes too fast);
-- cleared by the operator's next operation on the VM.
ALTER TABLE vms ADD COLUMN auto_restart_given_up_at BIGINT;

CREATE TABLE host_orphans (
    host_id TEXT NOT NULL REFERENCES hosts(id),
    -- No foreign key: the VM is unknown here, or placed on another host.
    vm_id TEXT NOT NULL,
    -- `destroyed` or `kept`: what the host's agent did with it.
    action TEXT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    PRIMARY KEY (host_id, vm_id)
);
