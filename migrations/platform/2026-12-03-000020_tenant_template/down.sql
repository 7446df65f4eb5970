DROP TABLE public.tenant_template;
