-- The schema whose transaction claimed a key: a tenant's schema for writes
-- to its own tables (`current_schema()` there), `public` for the others.
-- Moving a tenant to another shard takes its answers along by it. Run
-- again on every shard by `plinth migrate` (hence IF NOT EXISTS).
ALTER TABLE public.idempotency_keys ADD COLUMN IF NOT EXISTS schema_name text NOT NULL DEFAULT 'public';
CREATE INDEX IF NOT EXISTS idempotency_keys_schema_name ON public.idempotency_keys (schema_name);
