-- The PostgreSQL schema of creditmeter's PostgresStore (schema version 2).
--
-- PostgresStore runs this very file when it is built (create_schema=True, the
-- default) and from create_schema(), unless the meta table says the schema is
-- version 2 already: every statement is idempotent, and the store runs them in
-- one transaction under an advisory lock, so processes starting together do
-- not race. If you manage migrations yourself, run it once (psql -v
-- ON_ERROR_STOP=1 -1 -f postgres.sql) and build the store with
-- create_schema=False.
--
-- The names are those of the default table prefix, "creditmeter_". For
-- PostgresStore(dsn, prefix="billing_") replace "creditmeter_" with "billing_"
-- everywhere below (the store does exactly that); for schema="name", qualify
-- the three tables with it, or set search_path.
--
-- The data column holds each record as the JSON text creditmeter wrote
-- (creditmeter.serde), exactly, and is what the store reads back. The typed
-- columns beside it (numeric amounts, timestamptz times, token counts) are
-- written by the same statement, from the same record, for reporting and
-- audit in SQL:
--   SELECT user_id, balance FROM creditmeter_accounts ORDER BY balance DESC;
--   SELECT model, sum(-amount), sum(input_tokens) FROM creditmeter_ledger
--       WHERE kind = 'charge' GROUP BY model;
-- User ids and request ids use the "C" collation: compared and sorted by code
-- point, so "é" and "e" + U+0301 are different users, as in Python.
--
-- Needs PostgreSQL 13 or later (pg_current_xact_id, pg_snapshot_xmin).
--
-- Upgrading from schema version 1 (creditmeter before usage reports): a
-- store built with create_schema=True does it on its first start; with
-- create_schema=False run this file by hand, once, in one transaction, as
-- above. The upgrade adds the token columns (filled in for existing rows from
-- their JSON) and the tx column (0 for existing rows, which are all
-- committed), builds two indexes, and records version 2. It holds the
-- ledger's lock while it rewrites the rows that have usage and builds the
-- indexes, so writers wait: on a large ledger, run the two ALTER TABLE
-- statements first (they are quick), then build the two new indexes with
-- CREATE INDEX CONCURRENTLY, then the file (its IF NOT EXISTS skips them).
-- Processes of the old version still running meanwhile write their charges'
-- token counts in the JSON only: once they have all stopped, run the UPDATE
-- below (or the whole file) once more to fill them in.

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

-- tx is the id of the transaction that wrote the row. seq is NOT commit order
-- (a transaction may take seq 10 and commit after another took 11), so
-- readers of the whole ledger in commit order read by (tx, seq), and only rows
-- below the oldest transaction still running (pg_snapshot_xmin): no row can
-- appear there later. Token counts are NULL for entries without usage.
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
    input_tokens bigint,
    output_tokens bigint,
    cache_write_tokens bigint,
    cache_read_tokens bigint,
    tx bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    data text NOT NULL
);

-- From version 1: the new columns (nothing to do on a new table). tx is added
-- with 0 (no table rewrite), and only then gets its default for new rows.
ALTER TABLE creditmeter_ledger
    ADD COLUMN IF NOT EXISTS input_tokens bigint,
    ADD COLUMN IF NOT EXISTS output_tokens bigint,
    ADD COLUMN IF NOT EXISTS cache_write_tokens bigint,
    ADD COLUMN IF NOT EXISTS cache_read_tokens bigint,
    ADD COLUMN IF NOT EXISTS tx bigint NOT NULL DEFAULT 0;

ALTER TABLE creditmeter_ledger ALTER COLUMN tx SET DEFAULT pg_current_xact_id()::text::bigint;

-- The token counts of rows written without them, from their JSON. Only the
-- "usage" object is parsed: it holds nothing but counts, while other strings
-- of the record may hold a \u0000 escape, which PostgreSQL's JSON types refuse.
UPDATE creditmeter_ledger AS target
SET input_tokens = coalesce((found.usage ->> 'input')::bigint, 0),
    output_tokens = coalesce((found.usage ->> 'output')::bigint, 0),
    cache_write_tokens = coalesce((found.usage ->> 'cache_write')::bigint, 0),
    cache_read_tokens = coalesce((found.usage ->> 'cache_read')::bigint, 0)
FROM (
    SELECT seq, substring(data FROM '"usage":(\{[^{}]*\})')::json AS usage
    FROM creditmeter_ledger
    WHERE input_tokens IS NULL AND strpos(data, '"usage":{') > 0
) AS found
WHERE target.seq = found.seq AND found.usage IS NOT NULL;

-- A request id is applied at most once per user.
CREATE UNIQUE INDEX IF NOT EXISTS creditmeter_ledger_request
    ON creditmeter_ledger (user_id, request_id) WHERE request_id IS NOT NULL;

-- A user's ledger, in order.
CREATE INDEX IF NOT EXISTS creditmeter_ledger_user ON creditmeter_ledger (user_id, seq);

-- The whole ledger in commit order, for scans.
CREATE INDEX IF NOT EXISTS creditmeter_ledger_commit ON creditmeter_ledger (tx, seq);

-- Entries by time: usage reports and scans of a time range. (Nearly every row is
-- a charge, so an index of charges only would cost writes about as much.)
CREATE INDEX IF NOT EXISTS creditmeter_ledger_at ON creditmeter_ledger (at);

UPDATE creditmeter_meta SET value = '2' WHERE key = 'schema' AND value = '1';

INSERT INTO creditmeter_meta (key, value) VALUES ('schema', '2') ON CONFLICT (key) DO NOTHING;
