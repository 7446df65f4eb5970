DROP TABLE public.scim_group_members;
DROP TABLE public.scim_groups;
DROP TABLE public.scim_users;
DROP TABLE public.scim_tokens;
