-- Passkeys (WebAuthn): credentials a user registers on their devices, to
-- sign in without a password or as the second factor beside TOTP.

-- The user handle the authenticators store with a user's passkeys: 64
-- random bytes, made at the first registration. It tells nothing about
-- the account (not its id, not its address).
ALTER TABLE public.users ADD COLUMN passkey_handle bytea UNIQUE;

CREATE TABLE public.passkeys (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    -- The authenticator's credential id: unique across the whole site.
    credential_id bytea NOT NULL UNIQUE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- The public key and extensions as registered, and what changes at
    -- each use (signature counter, backup state), in webauthn_rp's
    -- binary encoding.
    static_state  bytea NOT NULL,
    dynamic_state bytea NOT NULL CHECK (octet_length(dynamic_state) = 7),
    transports    integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz
);
CREATE INDEX passkeys_user_id ON public.passkeys (user_id);

-- A ceremony on its way through the browser: the server's half, found by
-- the challenge the browser signs. Used once, within five minutes.
CREATE TABLE public.passkey_ceremonies (
    challenge  bytea PRIMARY KEY CHECK (octet_length(challenge) = 16),
    -- register: a new passkey for user_id; sign_in: a passkey alone;
    -- second_factor: after user_id's password.
    kind       text NOT NULL CHECK (kind IN ('register', 'sign_in', 'second_factor')),
    user_id    uuid REFERENCES public.users (id) ON DELETE CASCADE,
    state      bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    CHECK ((kind = 'sign_in') = (user_id IS NULL))
);
CREATE INDEX passkey_ceremonies_expires_at ON public.passkey_ceremonies (expires_at);
