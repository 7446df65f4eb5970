-- Failed logins, recorded once per attempt (never in each organization's
-- audit log): the account if the address has one, the client's address and
-- the request id. Written on every failed attempt, with or without an
-- account, so recording takes the same time either way.
CREATE TABLE public.login_failures (
    id         uuid PRIMARY KEY,
    user_id    uuid REFERENCES public.users (id) ON DELETE CASCADE,
    ip         text NOT NULL,
    request_id text,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_user_idx ON public.login_failures (user_id, at);
CREATE INDEX login_failures_at_idx ON public.login_failures (at);

-- A key minted by another key names it, so revoking a key revokes what it
-- minted; `created_by` is then the minting key's creator.
ALTER TABLE public.api_keys ADD COLUMN created_by_key uuid REFERENCES public.api_keys (id) ON DELETE SET NULL;
CREATE INDEX api_keys_created_by_idx ON public.api_keys (tenant_id, created_by);
CREATE INDEX api_keys_created_by_key_idx ON public.api_keys (created_by_key);

CREATE FUNCTION public.plinth_role_rank(role text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE role WHEN 'viewer' THEN 1 WHEN 'member' THEN 2 WHEN 'admin' THEN 3 WHEN 'owner' THEN 4 END
$$;

-- A key acts with at most its creator's current role: removing the creator
-- from the tenant revokes their keys, lowering their role revokes their
-- keys above the new role. In the database, so every path (the members
-- route, the CLI, deleting a user) keeps the rule.
CREATE FUNCTION public.plinth_revoke_keys_of_member() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE public.api_keys SET revoked_at = now()
         WHERE tenant_id = OLD.tenant_id AND created_by = OLD.user_id AND revoked_at IS NULL;
    ELSIF public.plinth_role_rank(NEW.role) < public.plinth_role_rank(OLD.role) THEN
        UPDATE public.api_keys SET revoked_at = now()
         WHERE tenant_id = NEW.tenant_id AND created_by = NEW.user_id AND revoked_at IS NULL
           AND public.plinth_role_rank(role) > public.plinth_role_rank(NEW.role);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER memberships_revoke_keys
    AFTER UPDATE OF role OR DELETE ON public.memberships
    FOR EACH ROW EXECUTE FUNCTION public.plinth_revoke_keys_of_member();

-- A key whose creator is deleted (created_by set NULL) is revoked with it.
CREATE FUNCTION public.plinth_revoke_orphaned_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.revoked_at := coalesce(NEW.revoked_at, now());
    RETURN NEW;
END;
$$;
CREATE TRIGGER api_keys_orphaned
    BEFORE UPDATE OF created_by ON public.api_keys
    FOR EACH ROW WHEN (NEW.created_by IS NULL AND OLD.created_by IS NOT NULL)
    EXECUTE FUNCTION public.plinth_revoke_orphaned_key();

-- Revoking a key revokes the keys it minted (and theirs, recursively).
CREATE FUNCTION public.plinth_revoke_minted_keys() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE public.api_keys SET revoked_at = now() WHERE created_by_key = NEW.id AND revoked_at IS NULL;
    RETURN NULL;
END;
$$;
CREATE TRIGGER api_keys_revoke_minted
    AFTER UPDATE ON public.api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION public.plinth_revoke_minted_keys();

-- The revocation NOTIFY fires on any update that revokes, not only on one
-- that names revoked_at (the orphan trigger sets it from an FK action).
DROP TRIGGER api_keys_revoked ON public.api_keys;
CREATE TRIGGER api_keys_revoked
    AFTER UPDATE ON public.api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION public.plinth_notify_api_key_revoked();

-- Keys that break the rule today: no creator left, a creator no longer a
-- member, or a role above the creator's.
UPDATE public.api_keys k SET revoked_at = now()
 WHERE k.revoked_at IS NULL
   AND NOT EXISTS (
       SELECT 1 FROM public.memberships m
        WHERE m.tenant_id = k.tenant_id AND m.user_id = k.created_by
          AND public.plinth_role_rank(m.role) >= public.plinth_role_rank(k.role));
