//! Invitations: an admin invites an address by mail with a role
//! (`POST /v1/invitations`), and the link's token joins the invited
//! address's account to the tenant, or creates the account
//! (`POST /v1/invitations/accept`). A pending invitation holds a seat.

use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Bytea, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Access, Allowed, Quota, Role, TenantContext, quota};
use plinth_http::idempotency::{self, IdempotencyKey};
use plinth_http::openapi::{ErrorEnvelope, IdempotencyKeyHeader, KeyReuse, PlanLimits, RateLimited, TenantHeader};
use plinth_http::request::{Json, RequestId};
use plinth_http::{ApiError, FieldError};
use plinth_mail::{self as mail, EmailAddress};
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::registry;
use plinth_tenants::{Db, TenantId, TenantRows, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::members::{JoinedMembers, ManageMembers, MembersChanged, caller, parse_role};
use crate::password::{self, Hashing};
use crate::schema::{invitations, memberships, users};
use crate::sessions::{self, Authenticated};
use crate::users::insert_user;

const INVITATION_DAYS: i64 = 7;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(send_invite).service(accept);
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    #[schema(schema_with = crate::openapi::email)]
    email: String,
    /// Only owners invite owners.
    #[schema(value_type = Role)]
    role: String,
}

#[derive(Serialize, ToSchema)]
struct Invitation {
    id: uuid::Uuid,
    #[schema(schema_with = crate::openapi::email)]
    email: String,
    role: Role,
    expires_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
struct Invited {
    invitation: Invitation,
}

#[derive(QueryableByName)]
struct InvitationRow {
    #[diesel(sql_type = SqlUuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Integer)]
    sent: i32,
    #[diesel(sql_type = Timestamptz)]
    expires_at: DateTime<Utc>,
}

/// `POST /v1/invitations` {email, role}: sends an invitation link; inviting
/// the same address again replaces the link and sends it again. Each mail
/// counts against a limit per recipient address (from every tenant) and one
/// per tenant (429 beyond), so no organization, or set of organizations,
/// can flood an inbox with a subject of its choosing.
#[utoipa::path(
    operation_id = "invite_member",
    tag = "members",
    summary = "Invites an address by mail; inviting it again sends a new link (admins)",
    description = "A pending invitation holds a seat: it counts against the plan's `members` limit until it is \
                   accepted or expires.",
    params(TenantHeader, IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = InviteBody,
    responses(
        (status = 201, body = Invited),
        PlanLimits,
        KeyReuse,
        (status = 409, description = "Error: conflict (the address is already a member), idempotency_key_in_use.", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/invitations")]
async fn send_invite(
    ctx: Allowed<ManageMembers>,
    db: web::Data<Db>,
    limits: web::Data<RateLimits>,
    body: Json<InviteBody>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    let (email, role) = body.0.parse()?;
    if role == Role::Owner && ctx.role != Role::Owner {
        return Err(ApiError::Forbidden);
    }
    let keyed = key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    idempotency::once(&db, keyed, async || {
        count(&limits.invitations_per_address, email.as_str()).await?;
        count(&limits.invitations_per_tenant, &ctx.tenant.id.to_string()).await?;
        let invite = Invite { email, role, inviter: caller(&ctx), entry: ctx.audit_entry("invitation.sent") };
        let (json, id, sent) = ctx
            .rows(async |rows| {
                idempotency::claim(rows.conn(), keyed).await?;
                let (invitation, email) = send_invitation(rows, &ctx, invite).await?;
                let invited = Invited {
                    invitation: Invitation {
                        id: invitation.id,
                        email: email.as_str().to_owned(),
                        role,
                        expires_at: invitation.expires_at,
                    },
                };
                let json = idempotency::record(rows.conn(), keyed, StatusCode::CREATED, &invited).await?;
                Ok::<_, ApiError>((json, invitation.id, invitation.sent))
            })
            .await?;
        tracing::info!(invitation.id = %id, role = role.as_str(), sent, "invitation sent");
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

impl InviteBody {
    /// The address and the role, or every problem with them at once.
    fn parse(self) -> Result<(EmailAddress, Role), ApiError> {
        let mut errors = Vec::new();
        let email = EmailAddress::parse(&self.email)
            .map_err(|e| errors.push(FieldError::new("email", "invalid", e.to_string())))
            .ok();
        let role = Role::parse(&self.role);
        if role.is_none() {
            errors.push(FieldError::new("role", "invalid", "must be owner, admin, member or viewer"));
        }
        match (email, role) {
            (Some(email), Some(role)) => Ok((email, role)),
            _ => Err(ApiError::invalid_fields(errors)),
        }
    }
}

/// An invitation to send.
struct Invite {
    email: EmailAddress,
    role: Role,
    inviter: Option<UserId>,
    entry: Entry,
}

/// Sends (or sends again) an invitation in the tenant's transaction: refuses
/// a member's address, takes a seat unless the address already holds a
/// pending invitation, stores the new link, queues the mail and records it.
async fn send_invitation(
    rows: &mut TenantRows<'_>,
    ctx: &TenantContext,
    invite: Invite,
) -> Result<(InvitationRow, EmailAddress), IdentityError> {
    let Invite { email, role, inviter, entry } = invite;
    if is_member(rows, &email).await? {
        return Err(IdentityError::AlreadyMember);
    }
    // Inviting the same address again replaces its pending invitation and
    // takes no new seat.
    if !has_pending_invitation(rows, &email).await? {
        ctx.reserve(rows.conn(), Quota::Members).await?;
    }
    let (token, hash) = sessions::new_token()?;
    let row = store_invitation(rows, &email, role, &hash, inviter).await?;
    let inviter_name = match inviter {
        Some(user) => member_email(rows, user).await?,
        None => None,
    };
    let message = crate::mail::invitation(
        email.clone(),
        rows.tenant_id(),
        &ctx.tenant.name,
        inviter_name.as_deref().unwrap_or("A colleague"),
        role.as_str(),
        &token,
        format!("invitation:{}:{}", row.id, row.sent),
    );
    mail::queue(rows.conn(), message).await?;
    let details = json!({ "email": email, "role": role, "sent": row.sent });
    audit::record(rows, entry.target("invitation", row.id).details(details)).await?;
    Ok((row, email))
}

/// Whether `email` belongs to a member of the tenant.
async fn is_member(rows: &mut TenantRows<'_>, email: &EmailAddress) -> diesel::QueryResult<bool> {
    let tenant = rows.tenant_id().0;
    diesel::select(diesel::dsl::exists(
        memberships::table
            .inner_join(users::table)
            .filter(memberships::tenant_id.eq(tenant))
            .filter(users::email.eq(email.as_str())),
    ))
    .get_result(rows.conn())
    .await
}

/// Whether `email` holds an unexpired, unaccepted invitation to the tenant.
async fn has_pending_invitation(rows: &mut TenantRows<'_>, email: &EmailAddress) -> diesel::QueryResult<bool> {
    let tenant = rows.tenant_id().0;
    diesel::select(diesel::dsl::exists(
        invitations::table
            .filter(invitations::tenant_id.eq(tenant))
            .filter(invitations::email.eq(email.as_str()))
            .filter(invitations::accepted_at.is_null())
            .filter(invitations::expires_at.gt(diesel::dsl::now)),
    ))
    .get_result(rows.conn())
    .await
}

/// Stores the invitation, replacing a pending one for the same address
/// (new link, role and expiry; `sent` counts the mails).
async fn store_invitation(
    rows: &mut TenantRows<'_>,
    email: &EmailAddress,
    role: Role,
    token_hash: &[u8; 32],
    inviter: Option<UserId>,
) -> diesel::QueryResult<InvitationRow> {
    let tenant = rows.tenant_id().0;
    // Raw SQL: an upsert on a partial unique index (pending invitations)
    // that also counts the resends.
    diesel::sql_query(
        "INSERT INTO public.invitations (id, tenant_id, email, role, token_hash, invited_by, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(days => $7)) \
         ON CONFLICT (tenant_id, email) WHERE accepted_at IS NULL DO UPDATE SET role = EXCLUDED.role, \
           token_hash = EXCLUDED.token_hash, invited_by = EXCLUDED.invited_by, \
           expires_at = EXCLUDED.expires_at, sent = public.invitations.sent + 1 \
         RETURNING id, sent, expires_at",
    )
    .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
    .bind::<SqlUuid, _>(tenant)
    .bind::<Text, _>(email.as_str())
    .bind::<Text, _>(role.as_str())
    .bind::<Bytea, _>(&token_hash[..])
    .bind::<Nullable<SqlUuid>, _>(inviter.map(|u| u.0))
    .bind::<Integer, _>(i32::try_from(INVITATION_DAYS).unwrap_or(7))
    .get_result(rows.conn())
    .await
}

/// A member's address, if `user` is a member of the tenant.
async fn member_email(rows: &mut TenantRows<'_>, user: UserId) -> diesel::QueryResult<Option<String>> {
    let tenant = rows.tenant_id().0;
    memberships::table
        .inner_join(users::table)
        .filter(memberships::tenant_id.eq(tenant))
        .filter(users::id.eq(user.0))
        .select(users::email)
        .first(rows.conn())
        .await
        .optional()
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AcceptBody {
    /// The token from the invitation mail.
    #[schema(schema_with = crate::openapi::mail_token)]
    token: String,
    /// Without a session: the existing account's password, or the new
    /// account's.
    #[schema(schema_with = crate::openapi::password, nullable = false)]
    password: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct InvitationAccepted {
    tenant_id: TenantId,
    user_id: uuid::Uuid,
    role: Role,
    /// A session for a new account (null when an existing one joined).
    token: Option<String>,
}

#[derive(Queryable)]
struct PendingRow {
    id: uuid::Uuid,
    tenant_id: uuid::Uuid,
    email: String,
    role: String,
}

#[derive(Queryable)]
struct ExistingUser {
    id: uuid::Uuid,
    password_hash: String,
}

/// `POST /v1/invitations/accept` {token, password?}: joins the invited
/// address's account (signed in as it, or with its password), or creates the
/// account (the link proves the address) and signs it in.
#[utoipa::path(
    operation_id = "accept_invitation",
    tag = "members",
    summary = "Accepts an invitation: joins with the session or password of the invited address, or creates its account",
    security((), ("session" = [])),
    request_body = AcceptBody,
    responses(
        (status = 200, body = InvitationAccepted),
        (status = 400, description = "Error: invalid_request (the token is unknown, used or expired; a new account's \
                                     password is missing or not allowed).", body = ErrorEnvelope),
        (status = 401, description = "Error: unauthenticated (the address has an account: sign in or give its password), \
                                     invalid_credentials.", body = ErrorEnvelope),
        (status = 403, description = "Error: forbidden (signed in as another account).", body = ErrorEnvelope),
        PlanLimits,
    ),
)]
#[post("/v1/invitations/accept")]
// One extractor per thing the handler needs.
#[allow(clippy::too_many_arguments)]
async fn accept(
    req: HttpRequest,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    cfg: Option<web::Data<IdentityConfig>>,
    hashing: web::Data<Hashing>,
    session: Option<Authenticated>,
    body: Json<AcceptBody>,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ApiError> {
    let cfg = config(cfg);
    let AcceptBody { token, password } = body.0;
    let (pending, existing, tenant) = db.platform(async |c| find_invitation(c, &token).await).await?;
    let email = EmailAddress::parse(&pending.email).map_err(|_| IdentityError::InvalidToken)?;
    let joiner = Joiner::prove(existing, session, password, &hashing).await?;
    let role = parse_role("role", &pending.role)?;
    let entry = Entry::new(Actor::System, "invitation.accepted").target("invitation", pending.id);
    let mut entry = match req.extensions().get::<RequestId>() {
        Some(id) => id.stamp(entry),
        None => entry,
    };
    entry.ip = Some(cfg.client_ip(&req));
    let limit = access.catalog().effective(&tenant.plan).limit(Quota::Members);
    let joined = Joined {
        invitation: pending.id,
        email,
        role,
        limit,
        session_ttl: cfg.session_ttl,
        device: sessions::Device::of(&req, &cfg),
    };
    let (user, token) = db
        .tenant_rows(tenant.scope(), async |rows| {
            let joined = join(rows, joined, &joiner, entry).await?;
            changed.changed(rows.conn(), tenant.id).await?;
            Ok::<_, IdentityError>(joined)
        })
        .await?;
    tracing::info!(invitation.id = %pending.id, user.id = %user, "invitation accepted");
    Ok(HttpResponse::Ok().json(InvitationAccepted { tenant_id: tenant.id, user_id: user, role, token }))
}

/// The pending invitation a token names, the account its address already
/// has (if any) and its tenant. Read before the joining transaction:
/// password hashing must not hold one open.
async fn find_invitation(
    c: &mut AsyncPgConnection,
    token: &str,
) -> Result<(PendingRow, Option<ExistingUser>, registry::Tenant), IdentityError> {
    let hash = sessions::hash_token(token);
    let pending: PendingRow = invitations::table
        .filter(invitations::token_hash.eq(&hash[..]))
        .filter(invitations::accepted_at.is_null())
        .filter(invitations::expires_at.gt(diesel::dsl::now))
        .select((invitations::id, invitations::tenant_id, invitations::email, invitations::role))
        .first(c)
        .await
        .optional()?
        .ok_or(IdentityError::InvalidToken)?;
    let user: Vec<ExistingUser> =
        users::table.filter(users::email.eq(&pending.email)).select((users::id, users::password_hash)).load(c).await?;
    let tenant = registry::find_by_id(c, TenantId(pending.tenant_id)).await?.ok_or(IdentityError::InvalidToken)?;
    Ok((pending, user.into_iter().next(), tenant))
}

/// Who is joining, and how they proved it.
enum Joiner {
    Existing(uuid::Uuid),
    /// A new account, with its password's hash.
    New(String),
}

impl Joiner {
    /// An existing account proves itself with its session or its password;
    /// a new one brings a password that meets the policy.
    async fn prove(
        existing: Option<ExistingUser>,
        session: Option<Authenticated>,
        password: Option<String>,
        hashing: &Hashing,
    ) -> Result<Self, IdentityError> {
        match (existing, session, password) {
            (Some(user), Some(Authenticated(s)), _) if s.user_id.0 == user.id => Ok(Self::Existing(user.id)),
            (_, Some(_), _) => Err(IdentityError::Forbidden),
            (Some(user), None, Some(password)) => {
                if !hashing.verify(&password, Some(user.password_hash)).await? {
                    return Err(IdentityError::InvalidCredentials);
                }
                Ok(Self::Existing(user.id))
            }
            (Some(_), None, None) => Err(IdentityError::Unauthenticated),
            (None, None, Some(password)) => {
                password::check("password", &password).map_err(|e| IdentityError::Invalid(vec![e]))?;
                Ok(Self::New(hashing.hash(password).await?))
            }
            (None, None, None) => Err(IdentityError::Invalid(vec![FieldError::new(
                "password",
                "required",
                "is needed to create the account",
            )])),
        }
    }
}

/// What accepting an invitation writes.
struct Joined {
    invitation: uuid::Uuid,
    email: EmailAddress,
    role: Role,
    /// The plan's members limit.
    limit: Option<u32>,
    session_ttl: std::time::Duration,
    device: sessions::Device,
}

/// Uses the invitation up (exactly once), creates the account if the joiner
/// is new (verified: the invitation reached the address), and makes the
/// membership, all in the tenant's transaction; returns the user and, for a
/// new account, its session token.
async fn join(
    rows: &mut TenantRows<'_>,
    joined: Joined,
    joiner: &Joiner,
    entry: Entry,
) -> Result<(uuid::Uuid, Option<String>), IdentityError> {
    let tenant = rows.tenant_id();
    // The seat lock first, as inviting takes it before touching an
    // invitation: the same order everywhere, so no deadlock. The invitation
    // held a seat; joining is refused only when the members alone have
    // reached the plan's limit (after a downgrade).
    quota::reserve(rows.conn(), tenant, Quota::Members, joined.limit, &JoinedMembers).await?;
    let used = diesel::update(
        invitations::table
            .filter(invitations::id.eq(joined.invitation))
            .filter(invitations::tenant_id.eq(tenant.0))
            .filter(invitations::accepted_at.is_null())
            .filter(invitations::expires_at.gt(diesel::dsl::now)),
    )
    .set(invitations::accepted_at.eq(diesel::dsl::now))
    .execute(rows.conn())
    .await?;
    if used != 1 {
        return Err(IdentityError::InvalidToken);
    }
    let (user, session) = match joiner {
        Joiner::Existing(id) => (*id, None),
        Joiner::New(hash) => {
            let user = insert_user(rows.conn(), &joined.email, hash).await?;
            diesel::update(users::table.find(user.id))
                .set(users::email_verified_at.eq(diesel::dsl::now))
                .execute(rows.conn())
                .await?;
            let (token, _) =
                sessions::create_session(rows.conn(), UserId(user.id), joined.session_ttl, &joined.device).await?;
            (user.id, Some(token))
        }
    };
    diesel::insert_into(memberships::table)
        .values((
            memberships::tenant_id.eq(tenant.0),
            memberships::user_id.eq(user),
            memberships::role.eq(joined.role.as_str()),
        ))
        .on_conflict_do_nothing()
        .execute(rows.conn())
        .await?;
    let entry = Entry { actor: Actor::User(user), ..entry }.details(json!({ "role": joined.role }));
    audit::record(rows, entry).await?;
    Ok((user, session))
}

/// An invitation not accepted yet, as the operator console lists it.
#[derive(Debug, Clone, Serialize, Queryable)]
pub struct Pending {
    pub email: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The tenant's invitations not accepted yet (expired ones included, with
/// their expiry), newest first.
pub async fn pending(rows: &mut TenantRows<'_>) -> diesel::QueryResult<Vec<Pending>> {
    let tenant = rows.tenant_id().0;
    invitations::table
        .filter(invitations::tenant_id.eq(tenant))
        .filter(invitations::accepted_at.is_null())
        .order(invitations::created_at.desc())
        .select((invitations::email, invitations::role, invitations::created_at, invitations::expires_at))
        .load(rows.conn())
        .await
}
