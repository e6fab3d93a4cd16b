-- Version 3: the intent generation a host had acted on when it made its last
-- observation of a VM (see VmObservation::intent_generation).

ALTER TABLE vms ADD COLUMN observed_intent_generation BIGINT NOT NULL DEFAULT 0;
