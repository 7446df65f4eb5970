-- Sessions a user can see and end: what opened each one (the client's
-- User-Agent and address) and when it was last used (recorded at most once
-- a minute per session).
ALTER TABLE public.sessions
    ADD COLUMN user_agent text CHECK (length(user_agent) <= 256),
    ADD COLUMN ip text,
    ADD COLUMN last_used_at timestamptz;

-- A tenant admin ended a member's sessions in that tenant: each such
-- session is refused there, and only there. Every instance drops the
-- session from its cache (the same channel as a revoked session).
CREATE TABLE public.session_tenant_ends (
    session_id uuid NOT NULL REFERENCES public.sessions (id) ON DELETE CASCADE,
    tenant_id  uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    ended_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, tenant_id)
);
CREATE INDEX session_tenant_ends_tenant_idx ON public.session_tenant_ends (tenant_id);
CREATE FUNCTION public.plinth_notify_session_ended_in_tenant() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('plinth_sessions', NEW.session_id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER session_tenant_ends_added
    AFTER INSERT ON public.session_tenant_ends
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_session_ended_in_tenant();

-- A change of address is confirmed from the new address: its token carries
-- that address.
ALTER TABLE public.user_tokens
    ADD COLUMN detail text,
    DROP CONSTRAINT user_tokens_purpose_check,
    ADD CONSTRAINT user_tokens_purpose_check
        CHECK (purpose IN ('verify_email', 'password_reset', 'change_email')),
    ADD CONSTRAINT user_tokens_detail_check CHECK ((purpose = 'change_email') = (detail IS NOT NULL));

-- A user's own export (POST /v1/me/export): the archive, kept until the
-- mailed link expires, so that any instance serves the download.
CREATE TABLE public.personal_exports (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    -- Emptied when the link expires (the link then answers 410).
    archive    jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX personal_exports_user_idx ON public.personal_exports (user_id, created_at DESC);

-- Erased accounts (DELETE /v1/me). The account row is gone; audit logs stay
-- append-only and keep naming the old user id, which this table maps to a
-- random pseudonym when the log is read. `email_sha256` lets a reader drop
-- the old address from entries' details. Nothing here names the person.
CREATE TABLE public.erased_users (
    user_id      uuid PRIMARY KEY,
    pseudonym    uuid NOT NULL UNIQUE,
    email_sha256 bytea NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX erased_users_email_idx ON public.erased_users (email_sha256);
