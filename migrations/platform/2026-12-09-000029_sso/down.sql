DROP TABLE public.sso_logins;
DROP TABLE public.sso_connections;
