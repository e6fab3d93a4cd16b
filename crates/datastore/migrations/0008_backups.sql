-- Version 8: storage: backups, snapshots and volumes. Backup targets (directories every host can reach),
-- restore points (full and incremental, chained through `parent_id`), VMs
-- whose disk starts as a restore point, and progress on host requests.

CREATE TABLE backup_targets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- An absolute directory, the same path on every host (e.g. an NFS mount).
    path TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    -- No foreign key: restore points outlive their VM.
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    target_id TEXT NOT NULL REFERENCES backup_targets(id),
    -- The restore point this one is incremental to (NULL: asked as full).
    parent_id TEXT REFERENCES backups(id),
    -- `full` or `incremental`: asked for, then what was taken.
    requested_mode TEXT NOT NULL,
    mode TEXT,
    fallback_reason TEXT,
    -- `running`, `succeeded` or `failed`. Only `succeeded` ones are restore points.
    status TEXT NOT NULL,
    error TEXT,
    -- The file, relative to the target's path.
    file TEXT NOT NULL,
    host_id TEXT,
    job_id TEXT NOT NULL,
    -- What a restore needs to rebuild the VM.
    image_id TEXT NOT NULL,
    flavor_id TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    data_bytes BIGINT,
    file_bytes BIGINT,
    sha256 TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    verified_at BIGINT,
    verify_ok BIGINT,
    verify_problems TEXT
);
CREATE INDEX backups_vm ON backups (vm_id, id);
CREATE INDEX backups_project ON backups (project_id, id);

-- A VM restored from a backup: its disk starts as this file (absolute path).
ALTER TABLE vms ADD COLUMN restore_from TEXT;

-- Progress of a long request (a backup), as the agent reports it.
ALTER TABLE host_requests ADD COLUMN progress_done BIGINT;
ALTER TABLE host_requests ADD COLUMN progress_total BIGINT;

-- Backup schedules and retention, one policy per VM.
CREATE TABLE backup_policies (
    vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    project_id TEXT NOT NULL REFERENCES projects(id),
    -- Where scheduled backups go (NULL: the VM's usual target).
    target_id TEXT REFERENCES backup_targets(id),
    -- A backup at most this often (NULL: no schedule, retention only).
    every_secs BIGINT,
    -- Retention: the newest N, the newest of each of the last N days and
    -- weeks (UTC). All zero: keep everything.
    keep_last BIGINT NOT NULL,
    keep_daily BIGINT NOT NULL,
    keep_weekly BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Disk snapshots of a VM (external qcow2 layers on its host).
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    -- `creating`, `ready` or `deleting`.
    status TEXT NOT NULL,
    -- The guest's file systems were frozen while it was taken.
    quiesced BIGINT,
    bytes BIGINT,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (vm_id, name)
);

-- Data volumes: qcow2 files on one host, attached to at most one VM.
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    -- Created as a copy-on-write clone of this image (NULL: blank).
    image_id TEXT REFERENCES images(id),
    -- `available`, `attaching`, `attached` or `detaching`.
    status TEXT NOT NULL,
    -- The host holding its file, once it has one (set at first attach).
    host_id TEXT REFERENCES hosts(id),
    -- The VM it is attached to (no foreign key: cleared when the VM goes).
    vm_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE INDEX volumes_vm ON volumes (vm_id);
