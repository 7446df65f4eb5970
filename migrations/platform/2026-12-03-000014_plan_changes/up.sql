-- A plan change an owner made that takes effect later (a downgrade at the
-- end of the period, held by a Stripe subscription schedule). Shown in the
-- subscription view until the subscription has the new plan.
CREATE TABLE public.billing_plan_changes (
    subscription_id text PRIMARY KEY REFERENCES public.subscriptions (id) ON DELETE CASCADE,
    tenant_id       uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    plan            text NOT NULL,
    effective_at    timestamptz,
    schedule_id     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_plan_changes_tenant_idx ON public.billing_plan_changes (tenant_id);
