DROP TABLE public.operator_log;
DROP TABLE public.tenant_identity_settings;
DROP INDEX public.sessions_impersonating_idx;
ALTER TABLE public.sessions
    DROP CONSTRAINT sessions_impersonation_whole,
    DROP COLUMN reason,
    DROP COLUMN tenant_id,
    DROP COLUMN impersonator_id;
