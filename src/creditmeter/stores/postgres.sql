-- The PostgreSQL schema of creditmeter's PostgresStore (schema version 1).
--
-- PostgresStore runs this very file when it is built (create_schema=True, the
-- default) and from create_schema(): every statement is idempotent, and the
-- store runs them in one transaction under an advisory lock, so processes
-- starting together do not race. If you manage migrations yourself, run it
-- once (psql -v ON_ERROR_STOP=1 -1 -f postgres.sql) and build the store with
-- create_schema=False.
--
-- The names are those of the default table prefix, "creditmeter_". For
-- PostgresStore(dsn, prefix="billing_") replace "creditmeter_" with "billing_"
-- everywhere below (the store does exactly that); for schema="name", qualify
-- the three tables with it, or set search_path.
--
-- The data column holds each record as the JSON text creditmeter wrote
-- (creditmeter.serde), exactly, and is what the store reads back. The typed
-- columns beside it (numeric amounts, timestamptz times) are filled from that
-- same document inside the writing statement, for reporting and audit in SQL:
--   SELECT user_id, balance FROM creditmeter_accounts ORDER BY balance DESC;
--   SELECT model, sum(-amount) FROM creditmeter_ledger WHERE kind = 'charge' GROUP BY model;
-- User ids and request ids use the "C" collation: compared and sorted by code
-- point, so "é" and "e" + U+0301 are different users, as in Python.

CREATE TABLE IF NOT EXISTS creditmeter_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE IF NOT EXISTS creditmeter_accounts (
    user_id text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL,
    balance numeric NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    last_refill timestamptz NOT NULL,
    data text NOT NULL
);

CREATE TABLE IF NOT EXISTS creditmeter_ledger (
    seq bigserial PRIMARY KEY,
    id text NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    amount numeric NOT NULL,
    balance_after numeric NOT NULL,
    cost numeric,
    at timestamptz NOT NULL,
    request_id text COLLATE "C",
    model text,
    data text NOT NULL
);

-- A request id is applied at most once per user.
CREATE UNIQUE INDEX IF NOT EXISTS creditmeter_ledger_request
    ON creditmeter_ledger (user_id, request_id) WHERE request_id IS NOT NULL;

-- A user's ledger, in order.
CREATE INDEX IF NOT EXISTS creditmeter_ledger_user ON creditmeter_ledger (user_id, seq);

INSERT INTO creditmeter_meta (key, value) VALUES ('schema', '1') ON CONFLICT (key) DO NOTHING;
