-- The PostgreSQL servers that hold tenant schemas ("shards"). `primary` is
-- the platform database itself (DATABASE_URL): it has no URL of its own.
-- Another shard's URL reaches a database holding only tenant schemas and
-- its own bookkeeping (`plinth_shard`, made by `plinth shards add`).
CREATE TABLE public.shards (
    name       text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,39}$'),
    url        text,
    state      text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'draining', 'closed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((name = 'primary') = (url IS NULL))
);
INSERT INTO public.shards (name, url) VALUES ('primary', NULL);

-- Where each tenant's schema lives.
ALTER TABLE public.tenants
    ADD COLUMN shard text NOT NULL DEFAULT 'primary' REFERENCES public.shards (name);
CREATE INDEX tenants_shard_idx ON public.tenants (shard);

-- Audit entries of tenants on other shards, written in the platform
-- transaction of the change they record and moved to the tenant's own
-- `audit_log` (same id) by `plinth_tenants::audit::deliver`.
CREATE TABLE public.audit_outbox (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_type  text NOT NULL,
    actor_id    uuid,
    action      text NOT NULL,
    target_type text,
    target_id   text,
    ip          text,
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_outbox_tenant_id_idx ON public.audit_outbox (tenant_id);
