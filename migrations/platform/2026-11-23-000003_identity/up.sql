-- Users are global; what they may do in a tenant comes from a membership.
CREATE TABLE public.users (
    id                uuid PRIMARY KEY,
    -- Normalized (trimmed, lowercased) by the application.
    email             text NOT NULL UNIQUE CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254),
    password_hash     text NOT NULL,
    email_verified_at timestamptz,
    -- Two-factor login (TOTP, RFC 6238). `totp_pending` holds a secret
    -- between enrolment and confirmation; `totp_last_step` is the newest time
    -- step accepted, so a code cannot be replayed.
    totp_secret       bytea,
    totp_pending      bytea,
    totp_last_step    bigint,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Single-use recovery codes for a lost authenticator (hashes only).
CREATE TABLE public.totp_recovery_codes (
    user_id   uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    code_hash bytea NOT NULL,
    used_at   timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE public.memberships (
    tenant_id  uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX memberships_user_id_idx ON public.memberships (user_id);

-- Every instance drops a changed membership from its cache
-- (payload: tenant id, a colon, user id).
CREATE FUNCTION public.plinth_notify_membership_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('plinth_memberships', OLD.tenant_id::text || ':' || OLD.user_id::text);
    ELSE
        PERFORM pg_notify('plinth_memberships', NEW.tenant_id::text || ':' || NEW.user_id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER memberships_changed
    AFTER INSERT OR UPDATE OR DELETE ON public.memberships
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_membership_changed();

-- Sessions: only a SHA-256 hash of the bearer token is stored.
CREATE TABLE public.sessions (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX sessions_user_id_idx ON public.sessions (user_id);

-- Single-use tokens sent by mail (email verification, password reset).
CREATE TABLE public.user_tokens (
    id         uuid PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (purpose IN ('verify_email', 'password_reset')),
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX user_tokens_user_id_idx ON public.user_tokens (user_id);

-- Invitations to join a tenant. One pending invitation per address and
-- tenant; inviting again replaces its token (the old link stops working).
CREATE TABLE public.invitations (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    email       text NOT NULL CHECK (email = lower(email)),
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    token_hash  bytea NOT NULL UNIQUE,
    invited_by  uuid REFERENCES public.users (id) ON DELETE SET NULL,
    sent        integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    accepted_at timestamptz
);
CREATE UNIQUE INDEX invitations_pending_idx ON public.invitations (tenant_id, email) WHERE accepted_at IS NULL;

-- Tenant API keys: a key acts in its one tenant with its role. Only a hash
-- of the secret is stored; `prefix` (the first characters) identifies it.
CREATE TABLE public.api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role         text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    prefix       text NOT NULL,
    token_hash   bytea NOT NULL UNIQUE,
    created_by   uuid REFERENCES public.users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant_id_idx ON public.api_keys (tenant_id);

CREATE FUNCTION public.plinth_notify_api_key_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('plinth_api_keys', OLD.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER api_keys_revoked
    AFTER UPDATE OF revoked_at ON public.api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION public.plinth_notify_api_key_revoked();
CREATE TRIGGER api_keys_deleted
    AFTER DELETE ON public.api_keys
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_api_key_revoked();

-- Every instance drops a revoked session from its cache (payload: session id).
CREATE FUNCTION public.plinth_notify_session_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('plinth_sessions', OLD.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER sessions_revoked
    AFTER UPDATE OF revoked_at ON public.sessions
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION public.plinth_notify_session_revoked();
CREATE TRIGGER sessions_deleted
    AFTER DELETE ON public.sessions
    FOR EACH ROW EXECUTE FUNCTION public.plinth_notify_session_revoked();
