ALTER TABLE public.idempotency_keys DROP COLUMN schema_name;
