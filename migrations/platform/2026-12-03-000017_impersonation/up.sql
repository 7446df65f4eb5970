-- Impersonation: a platform admin acting as one member, in one tenant, for
-- a short while. Such a session names the operator, the tenant it is bound
-- to and the reason given; the three come together or not at all.
ALTER TABLE public.sessions
    ADD COLUMN impersonator_id uuid REFERENCES public.users (id) ON DELETE CASCADE,
    ADD COLUMN tenant_id uuid REFERENCES public.tenants (id) ON DELETE CASCADE,
    ADD COLUMN reason text,
    ADD CONSTRAINT sessions_impersonation_whole CHECK (
        (impersonator_id IS NULL) = (tenant_id IS NULL) AND (impersonator_id IS NULL) = (reason IS NULL)
    );
CREATE INDEX sessions_impersonating_idx ON public.sessions (tenant_id) WHERE tenant_id IS NOT NULL;

-- A tenant's identity settings, kept by its owners. No row: the defaults.
CREATE TABLE public.tenant_identity_settings (
    tenant_id uuid PRIMARY KEY REFERENCES public.tenants (id) ON DELETE CASCADE,
    impersonation_allowed boolean NOT NULL DEFAULT true,
    updated_by uuid REFERENCES public.users (id) ON DELETE SET NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What platform admins did: the console's and the admin routes' own trail,
-- beside each tenant's audit log. Append-only; tenants may be gone, so the
-- tenant is named, not referenced.
CREATE TABLE public.operator_log (
    id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    operator_id uuid REFERENCES public.users (id) ON DELETE SET NULL,
    action text NOT NULL,
    tenant_id uuid,
    target text,
    details jsonb NOT NULL DEFAULT '{}',
    ip text,
    request_id text
);
CREATE INDEX operator_log_tenant_idx ON public.operator_log (tenant_id, id DESC);
