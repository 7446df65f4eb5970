//! Diesel declarations of identity's tables (schema-qualified, so they never
//! depend on `search_path`). Tables not declared here are still queried with
//! raw SQL; see `docs/architecture.md`.

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
    }
}
