DROP TABLE public.usage_events;
