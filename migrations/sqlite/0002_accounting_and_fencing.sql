-- Where every consumed position went, checkpointed with the state (so replays after a
-- failure never count twice), and the ownership epoch the checkpoint was written under.
ALTER TABLE checkpoints ADD COLUMN base_position    INTEGER NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN events_processed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN events_late      INTEGER NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN dead_lettered    INTEGER NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN skipped          INTEGER NOT NULL DEFAULT 0;
ALTER TABLE checkpoints ADD COLUMN owner_epoch      INTEGER NOT NULL DEFAULT 0;

-- Who owns a partition now: every start of a partition (assignment, restart) takes the
-- next epoch, and a checkpoint written under an older epoch is refused, so an owner
-- that lost its partition (a rebalance it has not noticed yet) cannot overwrite the
-- new owner's checkpoint.
CREATE TABLE IF NOT EXISTS partition_owners (
    partition   INTEGER PRIMARY KEY,
    epoch       INTEGER NOT NULL,
    owner       TEXT    NOT NULL,
    acquired_at INTEGER NOT NULL
);
