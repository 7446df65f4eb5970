-- Background jobs, claimed with FOR UPDATE SKIP LOCKED. A job is 'running'
-- while a worker holds its lease (locked_until); an expired lease makes it
-- claimable again. 'dead' jobs ran out of attempts and wait for an operator.
CREATE TABLE public.jobs (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL CHECK (length(kind) BETWEEN 1 AND 100),
    payload      jsonb NOT NULL DEFAULT '{}',
    tenant_id    uuid REFERENCES public.tenants (id) ON DELETE SET NULL,
    -- The same logical job is queued once per (kind, dedup_key).
    dedup_key    text,
    status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 10 CHECK (max_attempts >= 1),
    run_at       timestamptz NOT NULL DEFAULT now(),
    locked_by    text,
    locked_until timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE UNIQUE INDEX jobs_dedup_idx ON public.jobs (kind, dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX jobs_ready_idx ON public.jobs (run_at) WHERE status = 'queued';
CREATE INDEX jobs_lease_idx ON public.jobs (locked_until) WHERE status = 'running';
CREATE INDEX jobs_status_idx ON public.jobs (status, created_at);

-- Workers wake up as soon as a job is queued (delivered at commit, collapsed
-- to one per transaction). Row-level with a WHEN clause on purpose: a
-- statement-level trigger would also fire for a claim that matched nothing,
-- waking idle workers to claim again, forever.
CREATE FUNCTION public.plinth_notify_job_queued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('plinth_jobs', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER jobs_queued
    AFTER INSERT OR UPDATE OF status, run_at ON public.jobs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION public.plinth_notify_job_queued();

-- Mail waiting to be delivered, written in the same transaction as the change
-- that causes it. One message per idempotency key.
CREATE TABLE public.mail_outbox (
    id              uuid PRIMARY KEY,
    tenant_id       uuid REFERENCES public.tenants (id) ON DELETE SET NULL,
    idempotency_key text NOT NULL UNIQUE,
    recipient       text NOT NULL,
    template        text NOT NULL,
    -- Template data; emptied once the message is sent or given up, so tokens
    -- in links do not outlive their delivery.
    data            jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    smtp_response   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
