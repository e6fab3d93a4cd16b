-- Version 14: a restore point covers the VM's disk and every data volume
-- attached when it was taken. One row per (restore point, volume): the
-- volume's own file in the restore point (incremental to its file in the
-- parent restore point, or full), its figures and checksum. The volume's name
-- is kept as it was: the volume may be deleted (its backups stay).
CREATE TABLE backup_volumes (
    backup_id TEXT NOT NULL REFERENCES backups(id),
    -- No foreign key: restore points outlive their volumes.
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    -- The file, absolute: <target>/<vm-id>/<backup-id>.vol-<volume-id>.qcow2.
    file TEXT NOT NULL,
    -- `full` or `incremental`, and why a volume was copied in full in an
    -- incremental restore point.
    mode TEXT NOT NULL,
    fallback_reason TEXT,
    disk_bytes BIGINT NOT NULL,
    data_bytes BIGINT NOT NULL,
    file_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (backup_id, volume_id)
);

-- A volume restored beside a new VM (`backup restore --as`): the backup file
-- its content comes from, until the VM's create job has attached it (then
-- NULL). While set, the VM's host builds the volume from this file and
-- attaches it before the VM's first start.
ALTER TABLE volumes ADD COLUMN restore_from TEXT;
