DO $$
DECLARE s text;
BEGIN
    FOR s IN SELECT schema_name FROM public.tenant_spares LOOP
        EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s);
    END LOOP;
END
$$;
DROP TABLE public.tenant_spares;
