DROP TABLE public.tenant_email_domains;
