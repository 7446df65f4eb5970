DROP TABLE public.passkey_ceremonies;
DROP TABLE public.passkeys;
ALTER TABLE public.users DROP COLUMN passkey_handle;
