DROP TABLE public.invoices;
