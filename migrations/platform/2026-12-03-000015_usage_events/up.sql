-- Metered usage: each unit recorded in the transaction that does the work
-- (an outbox), then sent to Stripe's meter events API in batches. A batch
-- is the unsent units of one tenant and meter; its id is the meter event's
-- `identifier`, so a batch sent twice (a retry, two instances) counts once.
CREATE TABLE public.usage_events (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    meter       text NOT NULL,
    quantity    bigint NOT NULL CHECK (quantity > 0),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    batch_id    uuid,
    sent_at     timestamptz
);
CREATE INDEX usage_events_period_idx ON public.usage_events (tenant_id, meter, occurred_at);
CREATE INDEX usage_events_unsent_idx ON public.usage_events (batch_id) WHERE sent_at IS NULL;
