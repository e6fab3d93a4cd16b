-- Version 12: whether a host's migration streams are encrypted (its agent
-- has TLS credentials for QEMU migrations), as the agent reports it with
-- its facts: 'tls' or 'plain'. Both ends of a migration must agree, so the
-- scheduler moves VMs only between hosts with the same transport.
ALTER TABLE hosts ADD COLUMN migration_transport TEXT NOT NULL DEFAULT 'plain';
