-- Version 11: a snapshot covers the VM's disk and every data volume attached
-- when it was taken. The ids of those volumes, comma-separated ('' for none,
-- and for snapshots taken before volumes were covered); a volume a snapshot
-- covers is not detached (its layers belong to the VM's snapshot chain).
ALTER TABLE snapshots ADD COLUMN volumes TEXT NOT NULL DEFAULT '';
