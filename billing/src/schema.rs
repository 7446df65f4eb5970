//! Diesel declarations of billing's tables (schema-qualified).

diesel::table! {
    public.stripe_events (id) {
        id -> Text,
        #[sql_name = "type"]
        kind -> Nullable<Text>,
        object_id -> Nullable<Text>,
        created_at -> Nullable<Timestamptz>,
        payload -> Text,
        received_at -> Timestamptz,
        duplicates -> Integer,
        status -> Text,
        parked_reason -> Nullable<Text>,
        processed_at -> Nullable<Timestamptz>,
        api_version -> Nullable<Text>,
        customer_id -> Nullable<Text>,
    }
}

diesel::table! {
    public.billing_customers (customer_id) {
        customer_id -> Text,
        tenant_id -> Uuid,
        created_at -> Timestamptz,
        detached_at -> Nullable<Timestamptz>,
        detached_reason -> Nullable<Text>,
    }
}

diesel::table! {
    public.subscriptions (id) {
        id -> Text,
        tenant_id -> Uuid,
        customer_id -> Text,
        status -> Text,
        price_id -> Nullable<Text>,
        plan -> Nullable<Text>,
        trial_end -> Nullable<Timestamptz>,
        current_period_end -> Nullable<Timestamptz>,
        cancel_at_period_end -> Bool,
        past_due_since -> Nullable<Timestamptz>,
        deleted -> Bool,
        last_event_at -> Timestamptz,
        updated_at -> Timestamptz,
        cancel_at -> Nullable<Timestamptz>,
        pause_collection -> Nullable<Jsonb>,
    }
}

diesel::table! {
    public.billing_closures (customer_id) {
        customer_id -> Text,
        tenant_id -> Uuid,
        closed_at -> Timestamptz,
        result -> Jsonb,
    }
}

diesel::table! {
    public.invoices (id) {
        id -> Text,
        local_id -> Uuid,
        tenant_id -> Uuid,
        customer_id -> Text,
        subscription_id -> Nullable<Text>,
        number -> Nullable<Text>,
        status -> Nullable<Text>,
        amount_due -> BigInt,
        amount_paid -> BigInt,
        amount_remaining -> BigInt,
        currency -> Text,
        period_start -> Nullable<Timestamptz>,
        period_end -> Nullable<Timestamptz>,
        hosted_url -> Nullable<Text>,
        pdf_url -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.billing_plan_changes (subscription_id) {
        subscription_id -> Text,
        tenant_id -> Uuid,
        plan -> Text,
        effective_at -> Nullable<Timestamptz>,
        schedule_id -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    public.usage_events (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        meter -> Text,
        quantity -> BigInt,
        occurred_at -> Timestamptz,
        batch_id -> Nullable<Uuid>,
        sent_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    public.billing_entitlements (customer_id) {
        customer_id -> Text,
        tenant_id -> Uuid,
        lookup_keys -> Array<Text>,
        reported_at -> Timestamptz,
    }
}
