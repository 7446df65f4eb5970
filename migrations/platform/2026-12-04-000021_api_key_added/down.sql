DROP TRIGGER api_keys_added ON public.api_keys;
DROP FUNCTION public.plinth_notify_api_key_added();
