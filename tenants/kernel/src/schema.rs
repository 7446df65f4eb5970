//! Diesel declarations of the platform tables. They are schema-qualified
//! (`public.`) so they never depend on `search_path`.

diesel::table! {
    public.tenants (id) {
        id -> Uuid,
        slug -> Text,
        name -> Text,
        schema_name -> Text,
        status -> Text,
        plan -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        plan_source -> Text,
        restricted_at -> Nullable<Timestamptz>,
        features -> Nullable<Array<Text>>,
        shard -> Text,
        moving_to -> Nullable<Text>,
    }
}

diesel::table! {
    public.shard_replicas (id) {
        id -> Int8,
        shard -> Text,
        url -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.shards (name) {
        name -> Text,
        url -> Nullable<Text>,
        state -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.tenant_domains (domain) {
        domain -> Text,
        tenant_id -> Uuid,
        verified_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.tenant_migrations (tenant_id, version) {
        tenant_id -> Uuid,
        version -> Text,
        applied_at -> Timestamptz,
    }
}

diesel::table! {
    public.tenant_spares (schema_name) {
        schema_name -> Text,
        versions -> Array<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.tenant_template (one) {
        one -> Bool,
        tenant_id -> Uuid,
        set_at -> Timestamptz,
    }
}

diesel::joinable!(tenant_domains -> tenants (tenant_id));
diesel::joinable!(tenant_migrations -> tenants (tenant_id));
diesel::allow_tables_to_appear_in_same_query!(tenants, tenant_domains, tenant_migrations);

diesel::table! {
    public.idempotency_keys (caller, key) {
        caller -> Text,
        key -> Text,
        request_hash -> Bytea,
        status -> Int2,
        body -> Bytea,
        created_at -> Timestamptz,
        schema_name -> Text,
    }
}
