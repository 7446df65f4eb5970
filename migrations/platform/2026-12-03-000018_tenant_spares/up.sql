-- The warm pool: schemas made ahead of time with every tenant migration
-- applied, waiting for a tenant. Provisioning takes one (renaming it to the
-- tenant's schema) instead of running the migrations while signup waits.
-- A spare belongs to no tenant and no request can reach it: nothing routes
-- to a schema without a registry row.
CREATE TABLE public.tenant_spares (
    schema_name text PRIMARY KEY CHECK (schema_name ~ '^s_[0-9a-f]{32}$'),
    -- The tenant migrations it has: a spare is taken only while these are
    -- exactly the running binary's.
    versions    text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
