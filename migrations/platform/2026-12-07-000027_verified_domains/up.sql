-- Email domains an organization proves it owns (POST /v1/domains): by a DNS
-- TXT record at `_plinth-challenge.<domain>` holding
-- `plinth-domain-verification=<token>`, or by a link mailed to an
-- administrative address at the domain. A verified domain can let new users
-- of that domain join by themselves (`auto_join`, off by default). One domain
-- is verified by one organization at most.
CREATE TABLE public.tenant_email_domains (
    tenant_id        uuid NOT NULL REFERENCES public.tenants (id) ON DELETE CASCADE,
    domain           text NOT NULL CHECK (domain = lower(domain) AND length(domain) BETWEEN 3 AND 253),
    token            text NOT NULL,
    verified_at      timestamptz,
    verified_by      text CHECK (verified_by IN ('dns', 'email')),
    -- The mailed proof: a hash of the link's token, and when it expires.
    email_token_hash bytea UNIQUE,
    email_token_expires_at timestamptz,
    auto_join        boolean NOT NULL DEFAULT false,
    auto_join_role   text NOT NULL DEFAULT 'member' CHECK (auto_join_role IN ('admin', 'member', 'viewer')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, domain),
    CHECK ((verified_at IS NULL) = (verified_by IS NULL)),
    CHECK (verified_at IS NOT NULL OR NOT auto_join)
);
CREATE UNIQUE INDEX tenant_email_domains_verified_idx ON public.tenant_email_domains (domain)
    WHERE verified_at IS NOT NULL;
