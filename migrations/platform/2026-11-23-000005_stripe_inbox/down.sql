DROP TABLE public.subscriptions;
DROP TABLE public.billing_customers;
DROP TABLE public.stripe_events;
