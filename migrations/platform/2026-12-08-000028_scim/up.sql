-- SCIM 2.0 provisioning (`/scim/v2/`): an organization's directory (Okta,
-- Entra ID, ...) creates, deactivates and groups its members.

-- A tenant's SCIM bearer tokens (POST /v1/scim/tokens). Only a hash is kept;
-- the token names its tenant.
CREATE TABLE public.scim_tokens (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    prefix     text NOT NULL,
    token_hash bytea NOT NULL UNIQUE,
    created_by uuid REFERENCES public.users (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX scim_tokens_tenant_idx ON public.scim_tokens (tenant_id);

-- The directory's users in one tenant: the account (its address is the
-- SCIM userName) and what the directory says about it there. An inactive
-- user has no membership; reactivated, they get one again.
CREATE TABLE public.scim_users (
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    user_id      uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    external_id  text CHECK (length(external_id) <= 256),
    given_name   text CHECK (length(given_name) <= 256),
    family_name  text CHECK (length(family_name) <= 256),
    display_name text CHECK (length(display_name) <= 256),
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX scim_users_external_idx ON public.scim_users (tenant_id, external_id);

-- The directory's groups in one tenant. A tenant admin maps a group to a
-- role (PATCH /v1/scim/groups/{id}); a provisioned member holds the highest
-- role of their mapped groups, `member` when none is mapped.
CREATE TABLE public.scim_groups (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    display_name text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 256),
    external_id  text CHECK (length(external_id) <= 256),
    role         text CHECK (role IN ('admin', 'member', 'viewer')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, display_name),
    UNIQUE (tenant_id, id)
);

-- A group's members: users of the same tenant's directory (both foreign
-- keys carry the tenant, so no row links two tenants).
CREATE TABLE public.scim_group_members (
    tenant_id uuid NOT NULL,
    group_id  uuid NOT NULL,
    user_id   uuid NOT NULL,
    PRIMARY KEY (group_id, user_id),
    FOREIGN KEY (tenant_id, group_id) REFERENCES public.scim_groups (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, user_id) REFERENCES public.scim_users (tenant_id, user_id) ON DELETE CASCADE
);
CREATE INDEX scim_group_members_user_idx ON public.scim_group_members (tenant_id, user_id);
