-- Streaming replicas of a shard (the primary included), declared with
-- `plinth shards add-replica`. Each instance reads this list, checks every
-- replica's replay position and sends the tenant reads of GET routes to
-- those caught up (`plinth_tenants::replicas`).
CREATE TABLE public.shard_replicas (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shard      text NOT NULL REFERENCES public.shards (name),
    url        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (shard, url)
);
