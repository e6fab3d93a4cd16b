-- Version 5: when each host's desired state last changed, so a controller
-- watching for changes made through other controllers reads only the hosts
-- that changed recently instead of every host every second.

ALTER TABLE hosts ADD COLUMN desired_changed_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX hosts_desired_changed ON hosts (desired_changed_at);
