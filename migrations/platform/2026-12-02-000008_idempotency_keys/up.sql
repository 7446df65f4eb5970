-- Safe retries of writes (`Idempotency-Key`): the first answer to a
-- caller's key, replayed for 24 hours to a retry of the same request.
CREATE TABLE public.idempotency_keys (
    -- Who made the request: `user:<id>` or `api_key:<id>`.
    caller text NOT NULL,
    key text NOT NULL,
    -- SHA-256 of the method, path, tenant and body.
    request_hash bytea NOT NULL,
    status smallint NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_keys_created_at ON public.idempotency_keys (created_at);
