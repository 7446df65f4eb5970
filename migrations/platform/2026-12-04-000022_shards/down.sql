DROP TABLE public.audit_outbox;
DROP INDEX public.tenants_shard_idx;
ALTER TABLE public.tenants DROP COLUMN shard;
DROP TABLE public.shards;
