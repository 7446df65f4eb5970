//! `/scim/v2/Groups`: the directory's groups in one organization. A group
//! gives its members a role once a tenant admin maps it to one
//! (`PATCH /v1/scim/groups/{id}`); adding someone to a mapped group, or
//! removing them, changes their role at once (see `super::members`).
//! `displayName` is unique in the organization's directory. Members are
//! the directory's users of the same organization.

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, put, web};
use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DbError};
use diesel::{ExpressionMethods as _, JoinOnDsl as _, OptionalExtension as _, QueryDsl as _, Queryable};
use diesel_async::RunQueryDsl;
use plinth_http::ApiError;
use plinth_tenants::TenantRows;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::filter::{self, Equals};
use super::members::sync_roles;
use super::{
    GROUP_SCHEMA, ListQuery, Meta, Op, Operation, Page, PatchOp, Scim, ScimError, ScimErrors, answer, body,
    resource_id, text,
};
use crate::schema::{scim_group_members, scim_groups, scim_users, users};

pub(super) fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list).service(create).service(read).service(replace).service(modify).service(remove);
}

/// What `filter` may compare.
const FILTERABLE: &[&str] = &["displayname", "externalid", "id"];

/// A group as SCIM shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimGroup)]
struct GroupOut {
    schemas: Vec<&'static str>,
    id: uuid::Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    display_name: String,
    /// Absent when the list asked `excludedAttributes=members`.
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<Vec<MemberRef>>,
    meta: Meta,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ScimMemberRef)]
struct MemberRef {
    value: uuid::Uuid,
    #[serde(rename = "$ref")]
    reference: String,
    /// The member's address.
    display: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimGroupList)]
struct GroupList {
    schemas: Vec<&'static str>,
    total_results: i64,
    start_index: i64,
    items_per_page: usize,
    #[serde(rename = "Resources")]
    resources: Vec<GroupOut>,
}

/// A group as the directory sends it (`POST`, `PUT`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimGroupInput)]
struct GroupIn {
    #[serde(default)]
    #[allow(dead_code)] // Clients send it; nothing depends on it.
    schemas: Vec<String>,
    #[schema(min_length = 1, max_length = 256, example = "Engineering")]
    display_name: String,
    #[schema(max_length = 256)]
    external_id: Option<String>,
    /// Absent: none (`POST`), unchanged members are replaced (`PUT`).
    #[serde(default, deserialize_with = "super::objects::optional_list")]
    members: Option<Vec<MemberIn>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ScimMemberInput)]
struct MemberIn {
    /// A user's id in this directory.
    value: String,
}

#[derive(Debug, Clone, Queryable)]
struct Row {
    id: uuid::Uuid,
    display_name: String,
    external_id: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

type Columns = (
    scim_groups::id,
    scim_groups::display_name,
    scim_groups::external_id,
    scim_groups::created_at,
    scim_groups::updated_at,
);
const COLUMNS: Columns = (
    scim_groups::id,
    scim_groups::display_name,
    scim_groups::external_id,
    scim_groups::created_at,
    scim_groups::updated_at,
);

/// The organization's groups that match `filter`: how many, and `page` of
/// them, by name.
async fn find(rows: &mut TenantRows<'_>, filter: Option<&Equals>, page: Page) -> diesel::QueryResult<(i64, Vec<Row>)> {
    let tenant = rows.tenant_id().0;
    let matching = || {
        let mut query = scim_groups::table.filter(scim_groups::tenant_id.eq(tenant)).into_boxed();
        match filter {
            Some(Equals { attribute, value }) if attribute == "displayname" => {
                query = query.filter(scim_groups::display_name.eq(value.clone()));
            }
            Some(Equals { attribute, value }) if attribute == "externalid" => {
                query = query.filter(scim_groups::external_id.eq(value.clone()));
            }
            Some(Equals { value, .. }) => {
                query = query.filter(scim_groups::id.eq(uuid::Uuid::parse_str(value).unwrap_or(uuid::Uuid::nil())));
            }
            None => {}
        }
        query
    };
    let total: i64 = matching().count().get_result(rows.conn()).await?;
    let found = matching()
        .order((scim_groups::display_name.asc(), scim_groups::id.asc()))
        .offset(page.offset)
        .limit(page.limit)
        .select(COLUMNS)
        .load(rows.conn())
        .await?;
    Ok((total, found))
}

/// `found` as SCIM shows them, with their members unless `members` is false.
async fn shown(
    rows: &mut TenantRows<'_>,
    found: Vec<Row>,
    members: bool,
    base: &str,
) -> diesel::QueryResult<Vec<GroupOut>> {
    let ids: Vec<uuid::Uuid> = found.iter().map(|g| g.id).collect();
    let belong: Vec<(uuid::Uuid, uuid::Uuid, String)> = if members {
        scim_group_members::table
            .inner_join(users::table.on(users::id.eq(scim_group_members::user_id)))
            .filter(scim_group_members::tenant_id.eq(rows.tenant_id().0))
            .filter(scim_group_members::group_id.eq_any(&ids))
            .order(users::email.asc())
            .select((scim_group_members::group_id, users::id, users::email))
            .load(rows.conn())
            .await?
    } else {
        Vec::new()
    };
    Ok(found
        .into_iter()
        .map(|g| GroupOut {
            schemas: vec![GROUP_SCHEMA],
            id: g.id,
            external_id: g.external_id,
            display_name: g.display_name,
            members: members.then(|| {
                belong
                    .iter()
                    .filter(|(group, _, _)| *group == g.id)
                    .map(|(_, user, email)| MemberRef {
                        value: *user,
                        reference: format!("{base}/Users/{user}"),
                        display: email.clone(),
                        kind: "User",
                    })
                    .collect()
            }),
            meta: Meta {
                resource_type: "Group",
                created: g.created_at,
                last_modified: g.updated_at,
                location: format!("{base}/Groups/{}", g.id),
            },
        })
        .collect())
}

/// The group `id` of this organization as SCIM shows it; 404 when none.
async fn shown_one(rows: &mut TenantRows<'_>, id: uuid::Uuid, base: &str) -> Result<GroupOut, ScimError> {
    let filter = Equals { attribute: "id".into(), value: id.to_string() };
    let (_, found) = find(rows, Some(&filter), Page { offset: 0, limit: 1 }).await?;
    shown(rows, found, true, base).await?.pop().ok_or_else(|| ScimError::not_found("group"))
}

#[utoipa::path(
    operation_id = "scim_list_groups",
    tag = "scim",
    summary = "The directory's groups, filtered by `displayName`, `externalId` or `id` (`eq` only), paginated",
    params(
        ("filter" = Option<String>, Query, description = "`displayName eq \"Engineering\"`, `externalId eq \"…\"` or `id eq \"…\"`."),
        ("startIndex" = Option<i64>, Query, description = "The first result, from 1."),
        ("count" = Option<i64>, Query, description = "At most this many (100 at most)."),
        ("excludedAttributes" = Option<String>, Query, description = "`members` leaves the members out."),
    ),
    security(("scim_token" = [])),
    responses((status = 200, body = GroupList, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Groups")]
async fn list(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let page = query.page()?;
    let filter = query.filter.as_deref().map(|f| filter::parse(f, FILTERABLE)).transpose()?;
    let members = !query.excludes("members");
    let base = super::base_url(&req);
    let (total, groups) = ctx
        .rows(async |rows| {
            let (total, found) = find(rows, filter.as_ref(), page).await?;
            Ok::<_, ScimError>((total, shown(rows, found, members, &base).await?))
        })
        .await?;
    let list = GroupList {
        schemas: vec![super::LIST_SCHEMA],
        total_results: total,
        start_index: page.offset + 1,
        items_per_page: groups.len(),
        resources: groups,
    };
    answer(StatusCode::OK, &list)
}

/// The user ids of a `members` value; 400 unless each is an object with a
/// `value`.
fn member_ids(value: &serde_json::Value) -> Result<BTreeSet<uuid::Uuid>, ScimError> {
    let items = match value {
        serde_json::Value::Array(items) => items.as_slice(),
        single @ serde_json::Value::Object(_) => std::slice::from_ref(single),
        _ => return Err(ScimError::bad("invalidValue", "members must be a list of {\"value\": <user id>}")),
    };
    items
        .iter()
        .map(|item| {
            let id = item.get("value").and_then(serde_json::Value::as_str).unwrap_or_default();
            uuid::Uuid::parse_str(id)
                .map_err(|_| ScimError::bad("invalidValue", "each member must be {\"value\": <user id>}"))
        })
        .collect()
}

/// The group's members now.
async fn members_of(rows: &mut TenantRows<'_>, group: uuid::Uuid) -> diesel::QueryResult<BTreeSet<uuid::Uuid>> {
    let found: Vec<uuid::Uuid> = scim_group_members::table
        .filter(scim_group_members::group_id.eq(group))
        .filter(scim_group_members::tenant_id.eq(rows.tenant_id().0))
        .select(scim_group_members::user_id)
        .load(rows.conn())
        .await?;
    Ok(found.into_iter().collect())
}

/// Makes `wanted` the group's members, and the roles of everyone who
/// joined or left follow. 400 when one of them is not a user of this
/// organization's directory.
async fn set_members(
    rows: &mut TenantRows<'_>,
    ctx: &Scim,
    group: uuid::Uuid,
    wanted: &BTreeSet<uuid::Uuid>,
) -> Result<(), ScimError> {
    let tenant = rows.tenant_id().0;
    let now = members_of(rows, group).await?;
    let joining: Vec<uuid::Uuid> = wanted.difference(&now).copied().collect();
    let leaving: Vec<uuid::Uuid> = now.difference(wanted).copied().collect();
    let known: i64 = scim_users::table
        .filter(scim_users::tenant_id.eq(tenant))
        .filter(scim_users::user_id.eq_any(&joining))
        .count()
        .get_result(rows.conn())
        .await?;
    if usize::try_from(known).unwrap_or(0) != joining.len() {
        return Err(ScimError::bad("invalidValue", "every member must be a user of this organization's directory"));
    }
    let added: Vec<_> = joining
        .iter()
        .map(|user| {
            (
                scim_group_members::tenant_id.eq(tenant),
                scim_group_members::group_id.eq(group),
                scim_group_members::user_id.eq(*user),
            )
        })
        .collect();
    diesel::insert_into(scim_group_members::table).values(added).execute(rows.conn()).await?;
    diesel::delete(
        scim_group_members::table
            .filter(scim_group_members::group_id.eq(group))
            .filter(scim_group_members::user_id.eq_any(&leaving)),
    )
    .execute(rows.conn())
    .await?;
    let changed: Vec<uuid::Uuid> = joining.into_iter().chain(leaving).collect();
    sync_roles(rows, ctx, &changed).await
}

/// 409 when another group of the organization has the name.
fn name_taken(err: DbError) -> ScimError {
    match err {
        DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some("scim_groups_tenant_id_display_name_key") =>
        {
            ScimError::taken("the directory already has a group with this displayName")
        }
        other => other.into(),
    }
}

/// Stores a group's name and external id.
async fn rename(
    rows: &mut TenantRows<'_>,
    group: uuid::Uuid,
    name: &str,
    external_id: Option<&str>,
) -> Result<(), ScimError> {
    diesel::update(scim_groups::table.find(group))
        .set((
            scim_groups::display_name.eq(name),
            scim_groups::external_id.eq(external_id),
            scim_groups::updated_at.eq(diesel::dsl::now),
        ))
        .execute(rows.conn())
        .await
        .map_err(name_taken)?;
    Ok(())
}

/// A group's name and external id, checked.
fn checked(display_name: &str, external_id: Option<&str>) -> Result<(String, Option<String>), ScimError> {
    let name = text("displayName", Some(display_name))?
        .ok_or_else(|| ScimError::bad("invalidValue", "displayName must not be empty"))?;
    Ok((name, text("externalId", external_id)?))
}

#[utoipa::path(
    operation_id = "scim_create_group",
    tag = "scim",
    summary = "Creates a group of the directory's users (it gives a role once a tenant admin maps it)",
    security(("scim_token" = [])),
    request_body(content = GroupIn, content_type = "application/scim+json"),
    responses((status = 201, body = GroupOut, content_type = "application/scim+json"), ScimErrors),
)]
#[post("/scim/v2/Groups")]
async fn create(req: HttpRequest, ctx: Result<Scim, ApiError>, bytes: web::Bytes) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let input: GroupIn = body(&req, &bytes)?;
    let (name, external_id) = checked(&input.display_name, input.external_id.as_deref())?;
    let wanted = ids_of(input.members.as_deref())?;
    let base = super::base_url(&req);
    let id = uuid::Uuid::now_v7();
    let group = ctx
        .rows(async |rows| {
            diesel::insert_into(scim_groups::table)
                .values((
                    scim_groups::id.eq(id),
                    scim_groups::tenant_id.eq(rows.tenant_id().0),
                    scim_groups::display_name.eq(&name),
                    scim_groups::external_id.eq(&external_id),
                ))
                .execute(rows.conn())
                .await
                .map_err(name_taken)?;
            set_members(rows, &ctx, id, &wanted).await?;
            shown_one(rows, id, &base).await
        })
        .await?;
    tracing::info!(group.id = %id, "directory group created");
    super::created(&group, &group.meta)
}

/// The ids of a request's members.
fn ids_of(members: Option<&[MemberIn]>) -> Result<BTreeSet<uuid::Uuid>, ScimError> {
    members
        .unwrap_or_default()
        .iter()
        .map(|m| {
            uuid::Uuid::parse_str(&m.value)
                .map_err(|_| ScimError::bad("invalidValue", "each member must be {\"value\": <user id>}"))
        })
        .collect()
}

#[utoipa::path(
    operation_id = "scim_get_group",
    tag = "scim",
    summary = "One of the directory's groups, with its members",
    params(("id" = String, Path, description = "The group's id.")),
    security(("scim_token" = [])),
    responses((status = 200, body = GroupOut, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Groups/{id}")]
async fn read(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let id = resource_id(&path, "group")?;
    let base = super::base_url(&req);
    let group = ctx.rows(async |rows| shown_one(rows, id, &base).await).await?;
    answer(StatusCode::OK, &group)
}

/// The group `id` of this organization, locked for the transaction; 404
/// when none.
async fn locked(rows: &mut TenantRows<'_>, id: uuid::Uuid) -> Result<Row, ScimError> {
    scim_groups::table
        .filter(scim_groups::id.eq(id))
        .filter(scim_groups::tenant_id.eq(rows.tenant_id().0))
        .select(COLUMNS)
        .for_update()
        .first(rows.conn())
        .await
        .optional()?
        .ok_or_else(|| ScimError::not_found("group"))
}

#[utoipa::path(
    operation_id = "scim_replace_group",
    tag = "scim",
    summary = "Replaces a group's name and members; roles follow",
    params(("id" = String, Path, description = "The group's id.")),
    security(("scim_token" = [])),
    request_body(content = GroupIn, content_type = "application/scim+json"),
    responses((status = 200, body = GroupOut, content_type = "application/scim+json"), ScimErrors),
)]
#[put("/scim/v2/Groups/{id}")]
async fn replace(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let id = resource_id(&path, "group")?;
    let input: GroupIn = body(&req, &bytes)?;
    let (name, external_id) = checked(&input.display_name, input.external_id.as_deref())?;
    let wanted = ids_of(input.members.as_deref())?;
    let base = super::base_url(&req);
    let group = ctx
        .rows(async |rows| {
            locked(rows, id).await?;
            rename(rows, id, &name, external_id.as_deref()).await?;
            set_members(rows, &ctx, id, &wanted).await?;
            shown_one(rows, id, &base).await
        })
        .await?;
    answer(StatusCode::OK, &group)
}

/// A group's state while a PATCH is applied.
struct Patched {
    name: String,
    external_id: Option<String>,
    members: BTreeSet<uuid::Uuid>,
}

/// Applies one attribute of a PATCH: `path` lowercase; `value` `None` for
/// a removal without a value.
fn patch_attribute(
    state: &mut Patched,
    op: Op,
    path: &str,
    value: Option<&serde_json::Value>,
) -> Result<(), ScimError> {
    let string = |name: &str| match value {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(_) => Err(ScimError::bad("invalidValue", format!("{name} must be a string"))),
    };
    // `members[value eq "<id>"]`: one member (Okta's removal).
    if let Some(inner) = path.strip_prefix("members[").and_then(|p| p.strip_suffix(']')) {
        let Equals { value: id, .. } = filter::parse(inner, &["value"])?;
        let id = uuid::Uuid::parse_str(&id).map_err(|_| ScimError::bad("invalidValue", "a member is a user id"))?;
        return match op {
            Op::Remove => {
                state.members.remove(&id);
                Ok(())
            }
            _ => Err(ScimError::bad("invalidPath", "members[...] can only be removed")),
        };
    }
    match (path, op) {
        ("displayname", Op::Remove) => return Err(ScimError::bad("mutability", "displayName cannot be removed")),
        ("displayname", _) => {
            state.name =
                string("displayName")?.ok_or_else(|| ScimError::bad("invalidValue", "displayName is required"))?;
        }
        ("externalid", Op::Remove) => state.external_id = None,
        ("externalid", _) => state.external_id = string("externalId")?,
        ("members", Op::Add) => state.members.extend(member_ids(value.unwrap_or(&serde_json::Value::Null))?),
        ("members", Op::Replace) => state.members = member_ids(value.unwrap_or(&serde_json::Value::Null))?,
        // Without a value, every member; with one (Entra ID's form), those.
        ("members", Op::Remove) => match value {
            None | Some(serde_json::Value::Null) => state.members.clear(),
            Some(v) => {
                for id in member_ids(v)? {
                    state.members.remove(&id);
                }
            }
        },
        // The id is the server's; anything else is not kept.
        _ => {}
    }
    Ok(())
}

#[utoipa::path(
    operation_id = "scim_patch_group",
    tag = "scim",
    summary = "Changes a group (`PatchOp`): name, members added, removed or replaced; roles follow",
    params(("id" = String, Path, description = "The group's id.")),
    security(("scim_token" = [])),
    request_body(content = PatchOp, content_type = "application/scim+json"),
    responses((status = 200, body = GroupOut, content_type = "application/scim+json"), ScimErrors),
)]
#[patch("/scim/v2/Groups/{id}")]
async fn modify(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    path: web::Path<String>,
    bytes: web::Bytes,
) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let id = resource_id(&path, "group")?;
    let patch = PatchOp::read(&req, &bytes)?;
    let base = super::base_url(&req);
    let group = ctx
        .rows(async |rows| {
            let row = locked(rows, id).await?;
            let members = members_of(rows, id).await?;
            let mut state = Patched { name: row.display_name.clone(), external_id: row.external_id.clone(), members };
            for operation in &patch.operations {
                apply(&mut state, operation)?;
            }
            let (name, external_id) = checked(&state.name, state.external_id.as_deref())?;
            if name != row.display_name || external_id != row.external_id {
                rename(rows, id, &name, external_id.as_deref()).await?;
            }
            set_members(rows, &ctx, id, &state.members).await?;
            shown_one(rows, id, &base).await
        })
        .await?;
    answer(StatusCode::OK, &group)
}

/// Applies one PATCH operation to a group's state.
fn apply(state: &mut Patched, operation: &Operation) -> Result<(), ScimError> {
    let op = operation.op()?;
    let value = operation.value.as_ref();
    match operation.path.as_deref().map(|p| p.trim().to_ascii_lowercase()) {
        Some(path) => patch_attribute(state, op, &path, value),
        None if op == Op::Remove => Err(ScimError::bad("noTarget", "a remove operation needs a path")),
        // No path: the value is an object of attributes (Okta's form).
        None => match value {
            Some(serde_json::Value::Object(attributes)) => {
                for (name, v) in attributes {
                    patch_attribute(state, op, &name.to_ascii_lowercase(), Some(v))?;
                }
                Ok(())
            }
            _ => Err(ScimError::bad("invalidValue", "without a path, the value must be an object")),
        },
    }
}

#[utoipa::path(
    operation_id = "scim_delete_group",
    tag = "scim",
    summary = "Deletes a group; its members' roles follow",
    params(("id" = String, Path, description = "The group's id.")),
    security(("scim_token" = [])),
    responses((status = 204, description = "Deleted."), ScimErrors),
)]
#[delete("/scim/v2/Groups/{id}")]
async fn remove(ctx: Result<Scim, ApiError>, path: web::Path<String>) -> Result<HttpResponse, ScimError> {
    let ctx = ctx?;
    let id = resource_id(&path, "group")?;
    ctx.rows(async |rows| {
        locked(rows, id).await?;
        let members: Vec<uuid::Uuid> = members_of(rows, id).await?.into_iter().collect();
        diesel::delete(scim_groups::table.find(id)).execute(rows.conn()).await?;
        sync_roles(rows, &ctx, &members).await
    })
    .await?;
    tracing::info!(group.id = %id, "directory group deleted");
    Ok(HttpResponse::NoContent().finish())
}
