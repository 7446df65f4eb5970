DROP TABLE public.billing_plan_changes;
