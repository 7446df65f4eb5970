DROP TABLE public.erased_users;
DROP TABLE public.personal_exports;
DELETE FROM public.user_tokens WHERE purpose = 'change_email';
ALTER TABLE public.user_tokens
    DROP CONSTRAINT user_tokens_detail_check,
    DROP CONSTRAINT user_tokens_purpose_check,
    ADD CONSTRAINT user_tokens_purpose_check CHECK (purpose IN ('verify_email', 'password_reset')),
    DROP COLUMN detail;
DROP TABLE public.session_tenant_ends;
DROP FUNCTION public.plinth_notify_session_ended_in_tenant();
ALTER TABLE public.sessions
    DROP COLUMN last_used_at,
    DROP COLUMN ip,
    DROP COLUMN user_agent;
