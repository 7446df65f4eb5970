-- A tenant whose payment failed and whose grace period ended is restricted:
-- it reads but does not write until it pays. Set and cleared by billing;
-- part of the tenant's policy, so every instance follows within a second.
ALTER TABLE public.tenants ADD COLUMN restricted_at timestamptz;

DROP TRIGGER tenants_policy_changed ON public.tenants;
CREATE TRIGGER tenants_policy_changed
    AFTER INSERT OR DELETE OR UPDATE OF plan, status, restricted_at ON public.tenants
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_tenant_policy_changed();
