//! `/scim/v2/Users`: the directory's users in one organization.
//!
//! A user's `userName` is their account's address, and must be at one of
//! the organization's verified domains (400 otherwise): a domain the
//! organization proved it owns is what lets its directory speak for those
//! addresses. An address that has no account gets one, with a password
//! nobody knows (the person sets one through password reset); one that
//! has an account is linked to it. The address cannot change through SCIM.
//! `id` is the account's id. Attributes Plinth does not keep are accepted
//! and dropped.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, put, web};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, QueryableByName};
use diesel_async::RunQueryDsl;
use plinth_http::ApiError;
use plinth_mail::EmailAddress;
use plinth_tenants::TenantRows;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::filter::{self, Equals};
use super::members::{admit, release};
use super::user_patch::{Kept, patched, same_address};
use super::{
    ListQuery, Meta, Page, PatchOp, Scim, ScimError, ScimErrors, USER_SCHEMA, answer, body, resource_id, text,
};
use crate::members::MembersChanged;
use crate::password::Hashing;
use crate::schema::{scim_group_members, scim_groups, scim_users, tenant_email_domains};

pub(super) fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list).service(create).service(read).service(replace).service(modify).service(remove);
}

/// What `filter` may compare.
const FILTERABLE: &[&str] = &["username", "externalid", "id"];

/// A user as SCIM shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimUser)]
struct UserOut {
    schemas: Vec<&'static str>,
    id: uuid::Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    /// The account's address.
    user_name: String,
    name: NameOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    /// Whether the user is a member of the organization.
    active: bool,
    emails: Vec<EmailOut>,
    /// The directory groups the user is in.
    groups: Vec<GroupRef>,
    meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimName)]
struct NameOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    given_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    family_name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ScimEmail)]
struct EmailOut {
    value: String,
    #[serde(rename = "type")]
    kind: &'static str,
    primary: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ScimGroupRef)]
struct GroupRef {
    value: uuid::Uuid,
    #[serde(rename = "$ref")]
    reference: String,
    display: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimUserList)]
struct UserList {
    schemas: Vec<&'static str>,
    total_results: i64,
    start_index: i64,
    items_per_page: usize,
    #[serde(rename = "Resources")]
    resources: Vec<UserOut>,
}

/// A user as the directory sends it (`POST`, `PUT`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimUserInput)]
struct UserIn {
    #[serde(default)]
    #[allow(dead_code)] // Clients send it; nothing depends on it.
    schemas: Vec<String>,
    /// The account's address, at one of the organization's verified domains.
    #[schema(max_length = 254, example = "ada@example.com")]
    user_name: String,
    #[schema(max_length = 256)]
    external_id: Option<String>,
    #[serde(default, deserialize_with = "super::objects::optional")]
    name: Option<NameIn>,
    #[schema(max_length = 256)]
    display_name: Option<String>,
    /// Absent: active.
    active: Option<bool>,
    /// Accepted and not kept: the address is `userName`.
    #[allow(dead_code)]
    #[serde(default, deserialize_with = "super::objects::optional_list")]
    emails: Option<Vec<EmailIn>>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimNameInput)]
struct NameIn {
    #[schema(max_length = 256)]
    given_name: Option<String>,
    #[schema(max_length = 256)]
    family_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ScimEmailInput)]
#[allow(dead_code)]
struct EmailIn {
    value: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    primary: Option<bool>,
}

impl UserIn {
    /// The address and what is kept, checked.
    fn checked(&self) -> Result<(EmailAddress, Kept), ScimError> {
        let email = EmailAddress::parse(&self.user_name)
            .map_err(|_| ScimError::bad("invalidValue", "userName must be an email address"))?;
        let name = self.name.as_ref();
        let kept = Kept {
            external_id: text("externalId", self.external_id.as_deref())?,
            given_name: text("name.givenName", name.and_then(|n| n.given_name.as_deref()))?,
            family_name: text("name.familyName", name.and_then(|n| n.family_name.as_deref()))?,
            display_name: text("displayName", self.display_name.as_deref())?,
            active: self.active.unwrap_or(true),
        };
        Ok((email, kept))
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    user_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Nullable<Text>)]
    external_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    given_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    family_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    display_name: Option<String>,
    #[diesel(sql_type = Bool)]
    active: bool,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
}

impl Row {
    fn kept(&self) -> Kept {
        Kept {
            external_id: self.external_id.clone(),
            given_name: self.given_name.clone(),
            family_name: self.family_name.clone(),
            display_name: self.display_name.clone(),
            active: self.active,
        }
    }
}

#[derive(QueryableByName)]
struct Total {
    #[diesel(sql_type = BigInt)]
    total: i64,
}

/// The conditions of a user query: the tenant, then the filter's (an
/// absent one matches all).
const WHERE: &str = "FROM public.scim_users s JOIN public.users u ON u.id = s.user_id \
                     WHERE s.tenant_id = $1 AND ($2::text IS NULL OR u.email = $2) \
                     AND ($3::text IS NULL OR s.external_id = $3) AND ($4::uuid IS NULL OR s.user_id = $4)";

/// The filter's binds: address, external id, id. An id filter that is not
/// a UUID matches nothing (the nil UUID is nobody's).
fn binds(filter: Option<&Equals>) -> (Option<String>, Option<String>, Option<uuid::Uuid>) {
    match filter {
        Some(Equals { attribute, value }) if attribute == "username" => (Some(value.trim().to_lowercase()), None, None),
        Some(Equals { attribute, value }) if attribute == "externalid" => (None, Some(value.clone()), None),
        Some(Equals { value, .. }) => (None, None, Some(uuid::Uuid::parse_str(value).unwrap_or(uuid::Uuid::nil()))),
        None => (None, None, None),
    }
}

/// The directory's users that match `filter`: how many, and `page` of them.
async fn find(rows: &mut TenantRows<'_>, filter: Option<&Equals>, page: Page) -> diesel::QueryResult<(i64, Vec<Row>)> {
    let tenant = rows.tenant_id().0;
    let (email, external, id) = binds(filter);
    let total: Total = diesel::sql_query(format!("SELECT count(*) AS total {WHERE}"))
        .bind::<SqlUuid, _>(tenant)
        .bind::<Nullable<Text>, _>(email.clone())
        .bind::<Nullable<Text>, _>(external.clone())
        .bind::<Nullable<SqlUuid>, _>(id)
        .get_result(rows.conn())
        .await?;
    let found = diesel::sql_query(format!(
        "SELECT s.user_id, u.email, s.external_id, s.given_name, s.family_name, s.display_name, s.active, \
                s.created_at, s.updated_at {WHERE} ORDER BY s.created_at, s.user_id OFFSET $5 LIMIT $6"
    ))
    .bind::<SqlUuid, _>(tenant)
    .bind::<Nullable<Text>, _>(email)
    .bind::<Nullable<Text>, _>(external)
    .bind::<Nullable<SqlUuid>, _>(id)
    .bind::<BigInt, _>(page.offset)
    .bind::<BigInt, _>(page.limit)
    .load(rows.conn())
    .await?;
    Ok((total.total, found))
}

/// The directory user `user` of this organization, if there is one.
async fn one(rows: &mut TenantRows<'_>, user: uuid::Uuid) -> diesel::QueryResult<Option<Row>> {
    let filter = Equals { attribute: "id".into(), value: user.to_string() };
    let (_, mut found) = find(rows, Some(&filter), Page { offset: 0, limit: 1 }).await?;
    Ok(found.pop())
}

/// `found` as SCIM shows them, with their groups.
async fn shown(rows: &mut TenantRows<'_>, found: Vec<Row>, base: &str) -> diesel::QueryResult<Vec<UserOut>> {
    let tenant = rows.tenant_id().0;
    let ids: Vec<uuid::Uuid> = found.iter().map(|r| r.user_id).collect();
    let groups: Vec<(uuid::Uuid, uuid::Uuid, String)> = scim_group_members::table
        .inner_join(scim_groups::table)
        .filter(scim_group_members::tenant_id.eq(tenant))
        .filter(scim_group_members::user_id.eq_any(&ids))
        .order(scim_groups::display_name.asc())
        .select((scim_group_members::user_id, scim_groups::id, scim_groups::display_name))
        .load(rows.conn())
        .await?;
    Ok(found
        .into_iter()
        .map(|row| UserOut {
            schemas: vec![USER_SCHEMA],
            id: row.user_id,
            external_id: row.external_id,
            name: NameOut { given_name: row.given_name, family_name: row.family_name },
            display_name: row.display_name,
            active: row.active,
            emails: vec![EmailOut { value: row.email.clone(), kind: "work", primary: true }],
            user_name: row.email,
            groups: groups
                .iter()
                .filter(|(user, _, _)| *user == row.user_id)
                .map(|(_, id, name)| GroupRef {
                    value: *id,
                    reference: format!("{base}/Groups/{id}"),
                    display: name.clone(),
                })
                .collect(),
            meta: Meta {
                resource_type: "User",
                created: row.created_at,
                last_modified: row.updated_at,
                location: format!("{base}/Users/{}", row.user_id),
            },
        })
        .collect())
}

/// The user `user` as SCIM shows it; 404 when this directory has none.
async fn shown_one(rows: &mut TenantRows<'_>, user: uuid::Uuid, base: &str) -> Result<UserOut, ScimError> {
    let row = one(rows, user).await?.ok_or_else(|| ScimError::not_found("user"))?;
    shown(rows, vec![row], base).await?.pop().ok_or_else(|| ScimError::not_found("user"))
}

#[utoipa::path(
    operation_id = "scim_list_users",
    tag = "scim",
    summary = "The directory's users, filtered by `userName`, `externalId` or `id` (`eq` only), paginated",
    params(
        ("filter" = Option<String>, Query, description = "`userName eq \"alice@example.com\"`, `externalId eq \"…\"` or `id eq \"…\"`."),
        ("startIndex" = Option<i64>, Query, description = "The first result, from 1."),
        ("count" = Option<i64>, Query, description = "At most this many (100 at most)."),
    ),
    security(("scim_token" = [])),
    responses((status = 200, body = UserList, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Users")]
async fn list(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let page = query.page()?;
    let filter = query.filter.as_deref().map(|f| filter::parse(f, FILTERABLE)).transpose()?;
    let base = super::base_url(&req);
    let (total, users) = ctx
        .rows(async |rows| {
            let (total, found) = find(rows, filter.as_ref(), page).await?;
            Ok::<_, ScimError>((total, shown(rows, found, &base).await?))
        })
        .await?;
    let list = UserList {
        schemas: vec![super::LIST_SCHEMA],
        total_results: total,
        start_index: page.offset + 1,
        items_per_page: users.len(),
        resources: users,
    };
    answer(StatusCode::OK, &list)
}

/// 400 unless `email`'s domain is verified by this organization.
async fn require_verified_domain(rows: &mut TenantRows<'_>, email: &EmailAddress) -> Result<(), ScimError> {
    let tenant = rows.tenant_id().0;
    let domain = email.as_str().rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
    let verified: Option<String> = tenant_email_domains::table
        .filter(tenant_email_domains::tenant_id.eq(tenant))
        .filter(tenant_email_domains::domain.eq(domain))
        .filter(tenant_email_domains::verified_at.is_not_null())
        .select(tenant_email_domains::domain)
        .first(rows.conn())
        .await
        .optional()?;
    if verified.is_none() {
        return Err(ScimError::bad(
            "invalidValue",
            "userName must be an address at one of the organization's verified domains (POST /v1/domains)",
        ));
    }
    Ok(())
}

/// Writes what is kept of `user` (the row exists).
async fn store(rows: &mut TenantRows<'_>, user: uuid::Uuid, kept: &Kept) -> diesel::QueryResult<()> {
    let tenant = rows.tenant_id().0;
    diesel::update(scim_users::table.find((tenant, user)))
        .set((
            scim_users::external_id.eq(&kept.external_id),
            scim_users::given_name.eq(&kept.given_name),
            scim_users::family_name.eq(&kept.family_name),
            scim_users::display_name.eq(&kept.display_name),
            scim_users::active.eq(kept.active),
            scim_users::updated_at.eq(diesel::dsl::now),
        ))
        .execute(rows.conn())
        .await?;
    Ok(())
}

/// Makes membership follow `active`: admitted when it turns (or starts)
/// true, released when false.
async fn follow_active(
    rows: &mut TenantRows<'_>,
    ctx: &Scim,
    changed: &dyn MembersChanged,
    user: uuid::Uuid,
    active: bool,
) -> Result<(), ScimError> {
    if active { admit(rows, ctx, changed, user).await } else { release(rows, ctx, changed, user).await }
}

#[utoipa::path(
    operation_id = "scim_create_user",
    tag = "scim",
    summary = "Creates or links the account of an address at a verified domain; active, it joins the organization",
    security(("scim_token" = [])),
    request_body(content = UserIn, content_type = "application/scim+json"),
    responses((status = 201, body = UserOut, content_type = "application/scim+json"), ScimErrors),
)]
#[post("/scim/v2/Users")]
async fn create(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    bytes: web::Bytes,
    hashing: web::Data<Hashing>,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let input: UserIn = body(&req, &bytes)?;
    let (email, kept) = input.checked()?;
    let known =
        ctx.rows(async |rows| Ok::<_, ScimError>(crate::users::find_id_by_email(rows.conn(), &email).await?)).await?;
    let hash = match known {
        Some(_) => None,
        None => Some(hashing.hash(crate::password::unknown()?).await?),
    };
    let base = super::base_url(&req);
    let user = ctx
        .rows(async |rows| {
            require_verified_domain(rows, &email).await?;
            let user = match (crate::users::find_id_by_email(rows.conn(), &email).await?, &hash) {
                (Some(user), _) => user.0,
                (None, Some(hash)) => crate::users::insert_user(rows.conn(), &email, hash).await?.id,
                // Erased in between: the directory tries again.
                (None, None) => return Err(ScimError::conflict("the account changed meanwhile; try again")),
            };
            let tenant = rows.tenant_id().0;
            let added = diesel::insert_into(scim_users::table)
                .values((scim_users::tenant_id.eq(tenant), scim_users::user_id.eq(user)))
                .on_conflict_do_nothing()
                .execute(rows.conn())
                .await?;
            if added == 0 {
                return Err(ScimError::taken("the directory already has a user with this userName"));
            }
            store(rows, user, &kept).await?;
            follow_active(rows, &ctx, changed.get_ref(), user, kept.active).await?;
            shown_one(rows, user, &base).await
        })
        .await?;
    tracing::info!(user.id = %user.id, "directory user created");
    super::created(&user, &user.meta)
}

#[utoipa::path(
    operation_id = "scim_get_user",
    tag = "scim",
    summary = "One of the directory's users",
    params(("id" = String, Path, description = "The user's id.")),
    security(("scim_token" = [])),
    responses((status = 200, body = UserOut, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Users/{id}")]
async fn read(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let user = resource_id(&path, "user")?;
    let base = super::base_url(&req);
    let shown = ctx.rows(async |rows| shown_one(rows, user, &base).await).await?;
    answer(StatusCode::OK, &shown)
}

/// The directory user `user`, locked for the transaction; 404 when none.
async fn locked(rows: &mut TenantRows<'_>, user: uuid::Uuid) -> Result<Row, ScimError> {
    let tenant = rows.tenant_id().0;
    let exists: Option<uuid::Uuid> = scim_users::table
        .find((tenant, user))
        .select(scim_users::user_id)
        .for_update()
        .first(rows.conn())
        .await
        .optional()?;
    if exists.is_none() {
        return Err(ScimError::not_found("user"));
    }
    one(rows, user).await?.ok_or_else(|| ScimError::not_found("user"))
}

/// Applies a changed record: stores it, and admits or releases the member
/// when `active` changed.
async fn apply(
    rows: &mut TenantRows<'_>,
    ctx: &Scim,
    changed: &dyn MembersChanged,
    row: &Row,
    kept: &Kept,
) -> Result<(), ScimError> {
    store(rows, row.user_id, kept).await?;
    if kept.active != row.active {
        follow_active(rows, ctx, changed, row.user_id, kept.active).await?;
    }
    Ok(())
}

#[utoipa::path(
    operation_id = "scim_replace_user",
    tag = "scim",
    summary = "Replaces what is kept of a user (`userName` cannot change); `active: false` ends their membership and sessions",
    params(("id" = String, Path, description = "The user's id.")),
    security(("scim_token" = [])),
    request_body(content = UserIn, content_type = "application/scim+json"),
    responses((status = 200, body = UserOut, content_type = "application/scim+json"), ScimErrors),
)]
#[put("/scim/v2/Users/{id}")]
async fn replace(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
    bytes: web::Bytes,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let user = resource_id(&path, "user")?;
    let input: UserIn = body(&req, &bytes)?;
    let (_, kept) = input.checked()?;
    let base = super::base_url(&req);
    let shown = ctx
        .rows(async |rows| {
            let row = locked(rows, user).await?;
            same_address(&row.email, &input.user_name)?;
            apply(rows, &ctx, changed.get_ref(), &row, &kept).await?;
            shown_one(rows, user, &base).await
        })
        .await?;
    answer(StatusCode::OK, &shown)
}

#[utoipa::path(
    operation_id = "scim_patch_user",
    tag = "scim",
    summary = "Changes a user (`PatchOp`): names, externalId, `active` (false ends their membership and sessions)",
    params(("id" = String, Path, description = "The user's id.")),
    security(("scim_token" = [])),
    request_body(content = PatchOp, content_type = "application/scim+json"),
    responses((status = 200, body = UserOut, content_type = "application/scim+json"), ScimErrors),
)]
#[patch("/scim/v2/Users/{id}")]
async fn modify(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
    bytes: web::Bytes,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let user = resource_id(&path, "user")?;
    let patch = PatchOp::read(&req, &bytes)?;
    let base = super::base_url(&req);
    let shown = ctx
        .rows(async |rows| {
            let row = locked(rows, user).await?;
            let kept = patched(&row.email, row.kept(), &patch.operations)?;
            apply(rows, &ctx, changed.get_ref(), &row, &kept).await?;
            shown_one(rows, user, &base).await
        })
        .await?;
    answer(StatusCode::OK, &shown)
}

#[utoipa::path(
    operation_id = "scim_delete_user",
    tag = "scim",
    summary = "Removes a user from the directory: their membership and sessions here end; the account stays theirs",
    params(("id" = String, Path, description = "The user's id.")),
    security(("scim_token" = [])),
    responses((status = 204, description = "Removed."), ScimErrors),
)]
#[delete("/scim/v2/Users/{id}")]
async fn remove(
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
    changed: web::Data<dyn MembersChanged>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let user = resource_id(&path, "user")?;
    ctx.rows(async |rows| {
        let row = locked(rows, user).await?;
        release(rows, &ctx, changed.get_ref(), row.user_id).await?;
        let tenant = rows.tenant_id().0;
        diesel::delete(scim_users::table.find((tenant, user))).execute(rows.conn()).await?;
        Ok::<_, ScimError>(())
    })
    .await?;
    tracing::info!(user.id = %user, "directory user removed");
    Ok(HttpResponse::NoContent().finish())
}
