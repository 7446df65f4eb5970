DROP TABLE public.tenant_exports;
