-- Switchboard on PostgreSQL: the same data model as the embedded and Cassandra
-- stores (docs/design/why-time-buckets.md). Ids and positions are BIGINT (ids
-- are 63-bit snowflakes). Every read the gateway makes is a primary-key lookup
-- or a range scan of one index; see docs/design/why-postgres-layout.md.

CREATE TABLE users (
    id             BIGINT PRIMARY KEY,
    username       TEXT   NOT NULL,
    -- Uniqueness is on the lowercase form; registration relies on this index.
    username_lower TEXT   NOT NULL UNIQUE,
    password_hash  TEXT   NOT NULL,
    created_ms     BIGINT NOT NULL
);

CREATE TABLE conversations (
    id         BIGINT   PRIMARY KEY,
    kind       SMALLINT NOT NULL,
    title      TEXT     NOT NULL,
    created_ms BIGINT   NOT NULL,
    created_by BIGINT   NOT NULL,
    last_seq   BIGINT   NOT NULL,
    last_ts_ms BIGINT   NOT NULL
);

CREATE TABLE members (
    conversation_id BIGINT   NOT NULL,
    user_id         BIGINT   NOT NULL,
    role            SMALLINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
-- A user's conversations: an index-only range scan.
CREATE INDEX members_by_user ON members (user_id, conversation_id);

-- Mutes outlive membership changes, as in the other backends.
CREATE TABLE mutes (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

CREATE TABLE direct_pairs (
    user_lo         BIGINT NOT NULL,
    user_hi         BIGINT NOT NULL,
    conversation_id BIGINT NOT NULL,
    PRIMARY KEY (user_lo, user_hi)
);

-- Messages keep the Cassandra partitioning (conversation, day bucket) so that
-- paging behaves identically; the primary key is the clustering order.
CREATE TABLE messages (
    conversation_id BIGINT   NOT NULL,
    bucket          INTEGER  NOT NULL,
    seq             BIGINT   NOT NULL,
    ts_ms           BIGINT   NOT NULL,
    sender_id       BIGINT   NOT NULL,
    client_msg_id   TEXT     NOT NULL,
    kind            SMALLINT NOT NULL,
    body            TEXT     NOT NULL,
    target_user_id  BIGINT,
    role            SMALLINT,
    target_seq      BIGINT,
    edited_ms       BIGINT,
    PRIMARY KEY (conversation_id, bucket, seq)
);

CREATE TABLE message_buckets (
    conversation_id BIGINT  NOT NULL,
    bucket          INTEGER NOT NULL,
    first_seq       BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, bucket)
);

CREATE TABLE idempotency (
    conversation_id BIGINT NOT NULL,
    sender_id       BIGINT NOT NULL,
    client_msg_id   TEXT   NOT NULL,
    seq             BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, sender_id, client_msg_id)
);

CREATE TABLE positions (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    delivered       BIGINT NOT NULL,
    read            BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

CREATE TABLE reactions (
    conversation_id BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    emoji           TEXT   NOT NULL,
    PRIMARY KEY (conversation_id, seq, user_id)
);

CREATE TABLE presence (
    user_id        BIGINT  PRIMARY KEY,
    last_seen_ms   BIGINT,
    hide_last_seen BOOLEAN NOT NULL DEFAULT false
);
