ALTER TABLE public.jobs DROP COLUMN traceparent;
