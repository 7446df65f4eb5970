//! Diesel declarations of identity's tables (schema-qualified, so they never
//! depend on `search_path`).

diesel::table! {
    public.users (id) {
        id -> Uuid,
        email -> Text,
        password_hash -> Text,
        email_verified_at -> Nullable<Timestamptz>,
        totp_secret -> Nullable<Bytea>,
        totp_pending -> Nullable<Bytea>,
        totp_last_step -> Nullable<BigInt>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        passkey_handle -> Nullable<Bytea>,
    }
}

diesel::table! {
    public.memberships (tenant_id, user_id) {
        tenant_id -> Uuid,
        user_id -> Uuid,
        role -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.api_keys (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        name -> Text,
        role -> Text,
        prefix -> Text,
        token_hash -> Bytea,
        created_by -> Nullable<Uuid>,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        created_by_key -> Nullable<Uuid>,
    }
}

diesel::table! {
    public.sessions (id) {
        id -> Uuid,
        user_id -> Uuid,
        token_hash -> Bytea,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
        /// An impersonation session: the platform admin acting as `user_id`.
        impersonator_id -> Nullable<Uuid>,
        /// The one tenant an impersonation session acts in.
        tenant_id -> Nullable<Uuid>,
        reason -> Nullable<Text>,
        /// The User-Agent of the client that opened the session.
        user_agent -> Nullable<Text>,
        /// The address of the client that opened the session.
        ip -> Nullable<Text>,
        /// Recorded at most once a minute per session.
        last_used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Sessions a tenant admin ended in their tenant: refused there only.
    public.session_tenant_ends (session_id, tenant_id) {
        session_id -> Uuid,
        tenant_id -> Uuid,
        ended_at -> Timestamptz,
    }
}

diesel::table! {
    /// A user's own exports, kept until the mailed link expires.
    public.personal_exports (id) {
        id -> Uuid,
        user_id -> Uuid,
        token_hash -> Bytea,
        archive -> Nullable<Jsonb>,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    /// Erased accounts: the old id's pseudonym in audit logs.
    public.erased_users (user_id) {
        user_id -> Uuid,
        pseudonym -> Uuid,
        email_sha256 -> Bytea,
        erased_at -> Timestamptz,
    }
}

diesel::table! {
    public.tenant_identity_settings (tenant_id) {
        tenant_id -> Uuid,
        impersonation_allowed -> Bool,
        updated_by -> Nullable<Uuid>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    public.invitations (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        email -> Text,
        role -> Text,
        token_hash -> Bytea,
        invited_by -> Nullable<Uuid>,
        sent -> Integer,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        accepted_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Written only by the login's raw insert (a writable CTE that also
    /// prunes), declared so the table has its typed description too.
    public.login_failures (id) {
        id -> Uuid,
        user_id -> Nullable<Uuid>,
        ip -> Text,
        request_id -> Nullable<Text>,
        at -> Timestamptz,
    }
}

diesel::joinable!(memberships -> users (user_id));

diesel::table! {
    public.totp_recovery_codes (user_id, code_hash) {
        user_id -> Uuid,
        code_hash -> Bytea,
        used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    public.user_tokens (id) {
        id -> Uuid,
        user_id -> Uuid,
        purpose -> Text,
        token_hash -> Bytea,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        used_at -> Nullable<Timestamptz>,
        /// The new address of a `change_email` token.
        detail -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    users,
    memberships,
    api_keys,
    sessions,
    tenant_identity_settings,
    invitations,
    totp_recovery_codes,
    user_tokens,
    session_tenant_ends,
    personal_exports,
    erased_users
);

diesel::table! {
    /// Email domains an organization proves it owns.
    public.tenant_email_domains (tenant_id, domain) {
        tenant_id -> Uuid,
        domain -> Text,
        token -> Text,
        verified_at -> Nullable<Timestamptz>,
        verified_by -> Nullable<Text>,
        email_token_hash -> Nullable<Bytea>,
        email_token_expires_at -> Nullable<Timestamptz>,
        auto_join -> Bool,
        auto_join_role -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    /// A tenant's SCIM bearer tokens (only their hashes).
    public.scim_tokens (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        prefix -> Text,
        token_hash -> Bytea,
        created_by -> Nullable<Uuid>,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// The directory's users in a tenant.
    public.scim_users (tenant_id, user_id) {
        tenant_id -> Uuid,
        user_id -> Uuid,
        external_id -> Nullable<Text>,
        given_name -> Nullable<Text>,
        family_name -> Nullable<Text>,
        display_name -> Nullable<Text>,
        active -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// The directory's groups in a tenant, each mapped to a role or none.
    public.scim_groups (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        display_name -> Text,
        external_id -> Nullable<Text>,
        role -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// A directory group's members.
    public.scim_group_members (group_id, user_id) {
        tenant_id -> Uuid,
        group_id -> Uuid,
        user_id -> Uuid,
    }
}

diesel::joinable!(scim_users -> users (user_id));
diesel::joinable!(scim_group_members -> scim_groups (group_id));
diesel::allow_tables_to_appear_in_same_query!(scim_users, scim_groups, scim_group_members, users);

diesel::table! {
    /// An organization's OpenID Connect connection.
    public.sso_connections (tenant_id) {
        tenant_id -> Uuid,
        issuer -> Text,
        client_id -> Text,
        client_secret -> Bytea,
        domains -> Array<Text>,
        default_role -> Text,
        required -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// Sign-ins on their way through an identity provider.
    public.sso_logins (state_hash) {
        state_hash -> Bytea,
        tenant_id -> Uuid,
        nonce -> Text,
        pkce_verifier -> Bytea,
        redirect_uri -> Text,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Users' passkeys (WebAuthn credentials).
    public.passkeys (id) {
        id -> Uuid,
        user_id -> Uuid,
        credential_id -> Bytea,
        name -> Text,
        static_state -> Bytea,
        dynamic_state -> Bytea,
        transports -> Integer,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Passkey ceremonies on their way through a browser.
    public.passkey_ceremonies (challenge) {
        challenge -> Bytea,
        kind -> Text,
        user_id -> Nullable<Uuid>,
        state -> Bytea,
        expires_at -> Timestamptz,
    }
}

diesel::joinable!(passkeys -> users (user_id));
diesel::allow_tables_to_appear_in_same_query!(passkeys, users);
