-- OpenID Connect single sign-on, one connection per organization
-- (PUT /v1/sso/connection). People whose address is at one of its
-- domains (verified by the organization) sign in through the
-- organization's identity provider; with `required`, they cannot sign in
-- with a password.
CREATE TABLE public.sso_connections (
    tenant_id     uuid PRIMARY KEY REFERENCES public.tenants (id) ON DELETE CASCADE,
    issuer        text NOT NULL CHECK (length(issuer) BETWEEN 8 AND 2048),
    client_id     text NOT NULL CHECK (length(client_id) BETWEEN 1 AND 256),
    -- Sealed with PLINTH_ENCRYPTION_KEY.
    client_secret bytea NOT NULL,
    domains       text[] NOT NULL,
    default_role  text NOT NULL DEFAULT 'member' CHECK (default_role IN ('admin', 'member', 'viewer')),
    required      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A sign-in on its way through the identity provider: the state's hash,
-- the nonce and the PKCE verifier (sealed) it must come back with. Used
-- once, within ten minutes.
CREATE TABLE public.sso_logins (
    state_hash    bytea PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    nonce         text NOT NULL,
    pkce_verifier bytea NOT NULL,
    redirect_uri  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);
CREATE INDEX sso_logins_expires_idx ON public.sso_logins (expires_at);
