-- Version 6: every job runs as a saga whose log is kept here, so a
-- controller that dies mid-operation is replaced by one that resumes (or
-- unwinds) the operation from its last recorded step.

-- The saga's graph (steno's serialized DAG) once the job's saga is created,
-- and its coarse state (running, unwinding, done) as the engine last
-- reported it.
ALTER TABLE jobs ADD COLUMN saga_dag TEXT;
ALTER TABLE jobs ADD COLUMN saga_state TEXT;

-- The saga log: one row per node event (started, succeeded with its output,
-- failed, undo started, undo finished, undo failed). Recording is
-- idempotent: an event recorded twice is one row.
CREATE TABLE saga_events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    node_id BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    event TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (job_id, node_id, event_type)
);

-- Adoption looks for running jobs whose owner stopped renewing.
CREATE INDEX jobs_lease ON jobs (state, lease_expires_at);
CREATE INDEX jobs_owner ON jobs (owner);
