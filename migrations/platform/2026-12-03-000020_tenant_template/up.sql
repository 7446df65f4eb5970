-- The template tenant (at most one): new tenants start with a copy of its
-- rows (`plinth tenants template <slug>`).
CREATE TABLE public.tenant_template (
    one       boolean PRIMARY KEY DEFAULT true CHECK (one),
    tenant_id uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    set_at    timestamptz NOT NULL DEFAULT now()
);
