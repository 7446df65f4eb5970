ALTER TABLE public.tenants DROP COLUMN moving_to;
