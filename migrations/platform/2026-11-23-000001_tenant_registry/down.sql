DROP TRIGGER tenant_domains_changed ON public.tenant_domains;
DROP TRIGGER tenants_changed ON public.tenants;
DROP FUNCTION public.plinth_notify_tenants_changed();
DROP TABLE public.tenant_migrations;
DROP TABLE public.tenant_domains;
DROP TABLE public.tenants;
