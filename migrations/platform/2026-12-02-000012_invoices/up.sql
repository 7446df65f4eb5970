-- A local mirror of each tenant's Stripe invoices, kept by the invoice.*
-- webhooks and the periodic sync, so listing them never calls Stripe.
CREATE TABLE public.invoices (
    id               text PRIMARY KEY,              -- in_...
    -- The list's cursor.
    local_id         uuid NOT NULL UNIQUE,
    tenant_id        uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    customer_id      text NOT NULL,
    subscription_id  text,
    number           text,
    -- draft, open, paid, uncollectible, void
    status           text,
    -- In the currency's smallest unit, as Stripe gives them.
    amount_due       bigint NOT NULL DEFAULT 0,
    amount_paid      bigint NOT NULL DEFAULT 0,
    amount_remaining bigint NOT NULL DEFAULT 0,
    currency         text NOT NULL,
    period_start     timestamptz,
    period_end       timestamptz,
    hosted_url       text,
    pdf_url          text,
    -- Stripe's creation time: the list's order.
    created_at       timestamptz NOT NULL
);
CREATE INDEX invoices_tenant_idx ON public.invoices (tenant_id, created_at DESC, local_id DESC);
