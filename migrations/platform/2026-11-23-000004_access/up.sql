-- The platform admin grant (super-admins), separate from tenant roles.
CREATE TABLE public.platform_admins (
    user_id    uuid PRIMARY KEY REFERENCES public.users (id) ON DELETE CASCADE,
    granted_at timestamptz NOT NULL DEFAULT now()
);

-- Every instance re-reads a changed grant (payload: user id).
CREATE FUNCTION public.plinth_notify_platform_admin_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('plinth_platform_admins', OLD.user_id::text);
    ELSE
        PERFORM pg_notify('plinth_platform_admins', NEW.user_id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER platform_admins_changed
    AFTER INSERT OR UPDATE OR DELETE ON public.platform_admins
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_platform_admin_changed();

-- Every instance re-reads a tenant whose plan or status changed, so the
-- access policy follows within a second (payload: tenant id).
CREATE FUNCTION public.plinth_notify_tenant_policy_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('plinth_tenant_policy', OLD.id::text);
    ELSE
        PERFORM pg_notify('plinth_tenant_policy', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER tenants_policy_changed
    AFTER INSERT OR DELETE OR UPDATE OF plan, status ON public.tenants
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_tenant_policy_changed();
