-- The Stripe webhook inbox: every verified event, stored raw before it is
-- acknowledged, once per event id.
CREATE TABLE public.stripe_events (
    id            text PRIMARY KEY,            -- evt_...
    type          text,                        -- NULL when the body did not parse
    -- The id of the object the event is about (sub_..., cus_..., in_...).
    object_id     text,
    -- When Stripe created the event.
    created_at    timestamptz,
    -- The body exactly as received and signed.
    payload       text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    -- Deliveries of the same event id after the first.
    duplicates    integer NOT NULL DEFAULT 0,
    -- received -> processed, or parked (with the reason) until retried.
    status        text NOT NULL DEFAULT 'received' CHECK (status IN ('received', 'processed', 'parked')),
    parked_reason text,
    processed_at  timestamptz
);
CREATE INDEX stripe_events_object_idx ON public.stripe_events (object_id, created_at);
CREATE INDEX stripe_events_waiting_idx ON public.stripe_events (received_at) WHERE status <> 'processed';

-- Each tenant's Stripe customer (at most one), learned from checkout or
-- created by Plinth.
CREATE TABLE public.billing_customers (
    tenant_id   uuid PRIMARY KEY REFERENCES public.tenants (id) ON DELETE CASCADE,
    customer_id text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The newest known state of each subscription, and the creation time of
-- the newest event applied to it (older events are not applied).
CREATE TABLE public.subscriptions (
    id                   text PRIMARY KEY,
    tenant_id            uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    customer_id          text NOT NULL,
    status               text NOT NULL,
    price_id             text,
    plan                 text,
    trial_end            timestamptz,
    current_period_end   timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    past_due_since       timestamptz,
    deleted              boolean NOT NULL DEFAULT false,
    last_event_at        timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_tenant_idx ON public.subscriptions (tenant_id);

-- The inbox queues a processing job per event. Waking the workers with a
-- NOTIFY per job would serialise the inbox's commits on PostgreSQL's
-- notification queue; the inbox wakes them itself, at most every 20 ms
-- and always after its last event (billing/src/webhook.rs).
DROP TRIGGER jobs_queued ON public.jobs;
CREATE TRIGGER jobs_queued
    AFTER INSERT OR UPDATE OF status, run_at ON public.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.kind <> 'billing.event')
    EXECUTE FUNCTION public.plinth_notify_job_queued();
