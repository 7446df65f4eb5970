-- A tenant being moved to another shard (`plinth tenants move`): every
-- instance learns it through the registry's notification, and a request
-- that fails on the old server at the flip checks where the tenant went.
-- Also refuses migrations and deletion of the tenant meanwhile.
ALTER TABLE public.tenants ADD COLUMN moving_to text REFERENCES public.shards (name);
