-- Fencing (docs/design/fenced-commit.md): a conversation's owner epoch. A node
-- that takes a conversation over bumps it (`claim`); every commit of its owner
-- re-checks it under a row lock as its first statement, so a node that lost the
-- conversation can write nothing more into it.
ALTER TABLE conversations ADD COLUMN owner_epoch BIGINT NOT NULL DEFAULT 0;
