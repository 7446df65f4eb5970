DROP TRIGGER tenants_policy_changed ON public.tenants;
DROP FUNCTION public.plinth_notify_tenant_policy_changed();
DROP TRIGGER platform_admins_changed ON public.platform_admins;
DROP FUNCTION public.plinth_notify_platform_admin_changed();
DROP TABLE public.platform_admins;
