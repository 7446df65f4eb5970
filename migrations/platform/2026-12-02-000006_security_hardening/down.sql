DROP TRIGGER api_keys_revoked ON public.api_keys;
CREATE TRIGGER api_keys_revoked
    AFTER UPDATE OF revoked_at ON public.api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION public.plinth_notify_api_key_revoked();
DROP TRIGGER api_keys_revoke_minted ON public.api_keys;
DROP FUNCTION public.plinth_revoke_minted_keys();
DROP TRIGGER api_keys_orphaned ON public.api_keys;
DROP FUNCTION public.plinth_revoke_orphaned_key();
DROP TRIGGER memberships_revoke_keys ON public.memberships;
DROP FUNCTION public.plinth_revoke_keys_of_member();
DROP FUNCTION public.plinth_role_rank(text);
DROP INDEX public.api_keys_created_by_key_idx;
DROP INDEX public.api_keys_created_by_idx;
ALTER TABLE public.api_keys DROP COLUMN created_by_key;
DROP TABLE public.login_failures;
