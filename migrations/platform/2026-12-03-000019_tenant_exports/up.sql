-- An organization's own exports (POST /v1/tenant/exports): the archive a
-- job writes (the same as `plinth tenants backup`), kept here until the
-- mailed link expires, so that any instance can serve the download.
CREATE TABLE public.tenant_exports (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    requested_by uuid REFERENCES public.users (id) ON DELETE SET NULL,
    status       text NOT NULL CHECK (status IN ('queued', 'ready', 'failed', 'expired')),
    -- SHA-256 of the download link's token (the token itself is only mailed).
    token_hash   bytea,
    archive      bytea,
    bytes        bigint,
    sha256       text,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    ready_at     timestamptz,
    expires_at   timestamptz,
    CHECK ((status = 'ready') = (archive IS NOT NULL))
);
CREATE INDEX tenant_exports_tenant_idx ON public.tenant_exports (tenant_id, created_at DESC);
