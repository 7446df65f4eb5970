DROP TRIGGER sessions_deleted ON public.sessions;
DROP TRIGGER sessions_revoked ON public.sessions;
DROP FUNCTION public.plinth_notify_session_revoked();
DROP TABLE public.user_tokens;
DROP TABLE public.sessions;
DROP TRIGGER memberships_changed ON public.memberships;
DROP FUNCTION public.plinth_notify_membership_changed();
DROP TABLE public.memberships;
DROP TABLE public.users;
