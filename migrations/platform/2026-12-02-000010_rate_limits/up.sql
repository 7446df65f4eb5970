-- Rate limits shared by every instance (tenants/http/src/ratelimit.rs): per
-- limiter and key (the first 16 bytes of the key's SHA-256), the GCRA
-- "theoretical arrival time" of the next event. UNLOGGED: no WAL, not on
-- replicas, emptied by a crash of the server, which forgets the counts (the
-- limits start over; nothing else is lost). Drained rows (tat in the past)
-- mean nothing and are swept.
CREATE UNLOGGED TABLE public.rate_limits (
    limiter text NOT NULL,
    key bytea NOT NULL,
    tat timestamptz NOT NULL,
    PRIMARY KEY (limiter, key)
);
CREATE INDEX rate_limits_tat ON public.rate_limits (tat);
