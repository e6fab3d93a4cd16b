-- Stratus schema, version 1. Portable SQL: it runs unchanged on SQLite and
-- PostgreSQL. Ids are UUID text, times are microseconds since the epoch
-- (BIGINT), enums are snake_case text. No booleans: a nullable timestamp
-- says both "whether" and "when".

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    project_id TEXT REFERENCES projects(id),
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_tokens_project ON api_tokens (project_id, id);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    zone TEXT NOT NULL,
    cluster TEXT NOT NULL,
    address TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    qemu_version TEXT,
    accel TEXT,
    credential_hash TEXT NOT NULL UNIQUE,
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT
);

CREATE TABLE host_enrollment_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL REFERENCES api_tokens(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    host_id TEXT REFERENCES hosts(id)
);

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    visibility TEXT NOT NULL,
    state TEXT NOT NULL,
    format TEXT,
    virtual_size BIGINT,
    file_size BIGINT,
    sha256 TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE INDEX images_visibility ON images (visibility, id);

CREATE TABLE flavors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    vcpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    flavor_id TEXT NOT NULL REFERENCES flavors(id),
    image_id TEXT NOT NULL REFERENCES images(id),
    vcpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    desired_state TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT,
    host_id TEXT REFERENCES hosts(id),
    -- The job currently acting on this VM: at most one at a time.
    active_job_id TEXT,
    -- Bumped on every state change; agent reports older than this are stale.
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE INDEX vms_host ON vms (host_id, id);
CREATE INDEX vms_state ON vms (state, id);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    project_id TEXT REFERENCES projects(id),
    kind TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    state TEXT NOT NULL,
    progress BIGINT NOT NULL,
    current_step TEXT,
    error_code TEXT,
    error_message TEXT,
    -- The operation's parameters (JSON), so any controller can run it.
    params TEXT NOT NULL,
    idempotency_key TEXT,
    -- Which controller runs the job, and until when its claim holds.
    owner TEXT,
    lease_expires_at BIGINT,
    cancel_requested_at BIGINT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_project ON jobs (project_id, id);
CREATE INDEX jobs_target ON jobs (target_id, id);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (project_id, idempotency_key);

CREATE TABLE job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    step TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
