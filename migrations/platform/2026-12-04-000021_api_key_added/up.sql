-- A key that appears (created, or brought back by a restore) is announced
-- too: an instance may hold "no such key" for its secret, in its key cache
-- or in the access engine, from before the row existed.
CREATE FUNCTION public.plinth_notify_api_key_added() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('plinth_api_keys', NEW.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER api_keys_added
    AFTER INSERT ON public.api_keys
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_api_key_added();
