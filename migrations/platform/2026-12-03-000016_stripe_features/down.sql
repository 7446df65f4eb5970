DROP TABLE public.billing_entitlements;
DROP TRIGGER tenants_policy_changed ON public.tenants;
CREATE TRIGGER tenants_policy_changed
    AFTER INSERT OR DELETE OR UPDATE OF plan, status, restricted_at ON public.tenants
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_tenant_policy_changed();
ALTER TABLE public.tenants DROP COLUMN features;
