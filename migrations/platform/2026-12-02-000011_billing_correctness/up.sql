-- Billing as Stripe documents it (docs/billing.md).

-- Each event's API version (warned about when it differs from the pinned
-- one) and the customer it concerns (so a tenant's waiting events can be
-- shown as pending).
ALTER TABLE public.stripe_events ADD COLUMN api_version text, ADD COLUMN customer_id text;
CREATE INDEX stripe_events_customer_waiting_idx ON public.stripe_events (customer_id) WHERE status <> 'processed';

-- A tenant may have had several Stripe customers (one deleted in Stripe, a
-- newer checkout); every link is kept so late events still find their
-- tenant, and at most one is current.
ALTER TABLE public.billing_customers DROP CONSTRAINT billing_customers_pkey;
ALTER TABLE public.billing_customers ADD PRIMARY KEY (customer_id);
ALTER TABLE public.billing_customers DROP CONSTRAINT billing_customers_customer_id_key;
ALTER TABLE public.billing_customers ADD COLUMN detached_at timestamptz, ADD COLUMN detached_reason text;
CREATE UNIQUE INDEX billing_customers_current_idx ON public.billing_customers (tenant_id) WHERE detached_at IS NULL;

ALTER TABLE public.subscriptions ADD COLUMN cancel_at timestamptz, ADD COLUMN pause_collection jsonb;

-- Where the tenant's plan came from: billing (a new tenant's free plan, or
-- its Stripe subscriptions) or an operator (a platform admin, the CLI). The
-- periodic sync changes only billing's.
ALTER TABLE public.tenants ADD COLUMN plan_source text NOT NULL DEFAULT 'billing'
    CHECK (plan_source IN ('operator', 'billing'));
-- A paid plan without any subscription was an operator's.
UPDATE public.tenants t SET plan_source = 'operator'
    WHERE t.plan <> 'free' AND NOT EXISTS (SELECT 1 FROM public.subscriptions s WHERE s.tenant_id = t.id);

-- Customers of deleted tenants: what deletion did in Stripe. Later events
-- for them are recorded and ignored instead of parked.
CREATE TABLE public.billing_closures (
    customer_id text PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    closed_at   timestamptz NOT NULL DEFAULT now(),
    result      jsonb NOT NULL
);
