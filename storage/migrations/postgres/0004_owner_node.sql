-- The gateway node of a conversation's latest claim (`claim`), so that when a
-- node dies the conversations it owned and wrote lately are found and shown
-- again to their members (`claimed_by`). Written per claim, not per message.
ALTER TABLE conversations ADD COLUMN owner_node INTEGER;
CREATE INDEX conversations_owner_node ON conversations (owner_node) WHERE owner_node IS NOT NULL;
