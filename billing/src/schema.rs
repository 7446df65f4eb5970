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
    }
}

diesel::table! {
    public.billing_customers (tenant_id) {
        tenant_id -> Uuid,
        customer_id -> Text,
        created_at -> Timestamptz,
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
    }
}
