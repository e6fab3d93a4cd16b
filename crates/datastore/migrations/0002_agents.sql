-- Version 2: host agents. Desired state per host (a revision agents long-poll
-- on), observed VM state with generations, guest agent facts, requests for
-- agents (exec), console output, and kernel-boot images.

ALTER TABLE hosts ADD COLUMN desired_revision BIGINT NOT NULL DEFAULT 1;
ALTER TABLE hosts ADD COLUMN driver TEXT;

ALTER TABLE vms ADD COLUMN reboot_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN observed_state TEXT;
ALTER TABLE vms ADD COLUMN observed_reason TEXT;
ALTER TABLE vms ADD COLUMN observed_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN observed_reboot_generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN observed_at BIGINT;
-- The guest agent's last report, as JSON (GuestAgentInfo).
ALTER TABLE vms ADD COLUMN guest TEXT;

ALTER TABLE images ADD COLUMN kernel_sha256 TEXT;
ALTER TABLE images ADD COLUMN initrd_sha256 TEXT;
ALTER TABLE images ADD COLUMN cmdline TEXT;

CREATE TABLE host_requests (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL REFERENCES hosts(id),
    vm_id TEXT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    answered_at BIGINT,
    result TEXT,
    error TEXT
);
CREATE INDEX host_requests_host ON host_requests (host_id, answered_at);

-- The newest console output of each VM (bounded; older bytes are dropped).
CREATE TABLE vm_consoles (
    vm_id TEXT PRIMARY KEY,
    start_offset BIGINT NOT NULL,
    end_offset BIGINT NOT NULL,
    data TEXT NOT NULL
);
