-- Where every consumed position went, checkpointed with the state (so replays after a
-- failure never count twice), and the ownership epoch the checkpoint was written under.
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS base_position    BIGINT NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS events_processed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS events_late      BIGINT NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS dead_lettered    BIGINT NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS skipped          BIGINT NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS owner_epoch      BIGINT NOT NULL DEFAULT 0;

-- Who owns a partition now: every start of a partition (assignment, restart) takes the
-- next epoch, and a checkpoint written under an older epoch is refused, so an owner
-- that lost its partition (a rebalance it has not noticed yet) cannot overwrite the
-- new owner's checkpoint.
CREATE TABLE IF NOT EXISTS partition_owners (
    partition   INTEGER     PRIMARY KEY,
    epoch       BIGINT      NOT NULL,
    owner       TEXT        NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
