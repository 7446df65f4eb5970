-- With PLINTH_BILLING_FEATURES=stripe, a tenant's features come from its
-- Stripe entitlements instead of its plan: `features` holds them (NULL: the
-- plan's, as the catalog says). Part of the tenant's policy.
ALTER TABLE public.tenants ADD COLUMN features text[];

DROP TRIGGER tenants_policy_changed ON public.tenants;
CREATE TRIGGER tenants_policy_changed
    AFTER INSERT OR DELETE OR UPDATE OF plan, status, restricted_at, features ON public.tenants
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_tenant_policy_changed();

-- The entitlements Stripe last reported for a customer (lookup keys), and
-- when: an older report does not replace a newer one.
CREATE TABLE public.billing_entitlements (
    customer_id text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    lookup_keys text[] NOT NULL,
    reported_at timestamptz NOT NULL
);
