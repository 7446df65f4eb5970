DROP TABLE public.shard_replicas;
