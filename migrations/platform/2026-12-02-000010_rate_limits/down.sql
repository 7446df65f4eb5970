DROP TABLE public.rate_limits;
