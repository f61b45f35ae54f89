-- Text bodies sealed under per-message keys (storage/src/seal.rs): a sealed row
-- keeps an empty `body` and its ciphertext in `sealed`. Text messages and their
-- `edit` events are sealed under the key of the text message (`seq` of the
-- message, `target_seq` of an edit). A delete removes the key; `gateway erase`
-- (VACUUM FULL of this table, then a WAL switch and a checkpoint) removes its
-- bytes from the database's files.
ALTER TABLE messages ADD COLUMN sealed BYTEA;

CREATE TABLE message_keys (
    conversation_id BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    key             BYTEA  NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
