//! The example product domain: projects and their tasks, stored in each
//! tenant's own schema. It shows how a SaaS product built on Plinth adds its
//! tables (`migrations/tenant/`) and routes: store functions take a
//! [`TenantConn`], so they cannot run against another tenant's schema, and
//! handlers stay thin.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use plinth_access::Quota;
use plinth_access::{Allowed, requirements};
use plinth_http::ApiError;
use plinth_http::idempotency::{self, IdempotencyKey};
use plinth_http::openapi::{
    IdempotencyKeyHeader, KeyReuse, NotFound, PageQuery, PlanLimits, TenantHeader, optional_text, text,
};
use plinth_http::request::{Json, Page, PageParams, PageRequest, Validator};
use plinth_tenants::db::TenantSql;
use plinth_tenants::{Db, TenantConn, uuid_id};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::ObjectBuilder;

/// Tenant tables, unqualified: they resolve through the tenant-scoped
/// transaction's `search_path`.
mod schema {
    diesel::table! {
        projects (id) {
            id -> Uuid,
            name -> Text,
            description -> Text,
            created_at -> Timestamptz,
            updated_at -> Timestamptz,
        }
    }

    diesel::table! {
        tasks (id) {
            id -> Uuid,
            project_id -> Uuid,
            title -> Text,
            done -> Bool,
            created_at -> Timestamptz,
            updated_at -> Timestamptz,
        }
    }

    diesel::joinable!(tasks -> projects (project_id));
    diesel::allow_tables_to_appear_in_same_query!(projects, tasks);
}

use schema::{projects, tasks};

uuid_id!(
    /// Identifies a project within its tenant.
    ProjectId
);
uuid_id!(
    /// Identifies a task within its tenant.
    TaskId
);

#[derive(Debug, Clone, Serialize, Queryable, QueryableByName, Selectable, Insertable, ToSchema)]
#[diesel(table_name = projects)]
pub struct Project {
    pub id: ProjectId,
    #[schema(schema_with = project_name)]
    pub name: String,
    #[schema(schema_with = project_description)]
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Queryable, Selectable, Insertable, ToSchema)]
#[diesel(table_name = tasks)]
pub struct Task {
    pub id: TaskId,
    pub project_id: ProjectId,
    #[schema(schema_with = task_title)]
    pub title: String,
    pub done: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    #[schema(schema_with = project_name)]
    pub name: String,
    #[serde(default)]
    #[schema(schema_with = project_description)]
    pub description: String,
}

/// The fields to change; those left out keep their value.
#[derive(Debug, Default, Deserialize, AsChangeset, ToSchema)]
#[serde(deny_unknown_fields)]
#[diesel(table_name = projects)]
pub struct ProjectChanges {
    #[schema(schema_with = new_project_name)]
    pub name: Option<String>,
    #[schema(schema_with = new_project_description)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    #[schema(schema_with = task_title)]
    pub title: String,
    #[serde(default)]
    pub done: bool,
}

/// The fields to change; those left out keep their value.
#[derive(Debug, Default, Deserialize, AsChangeset, ToSchema)]
#[serde(deny_unknown_fields)]
#[diesel(table_name = tasks)]
pub struct TaskChanges {
    #[schema(schema_with = new_task_title)]
    pub title: Option<String>,
    pub done: Option<bool>,
}

const NAME_MAX: usize = 200;
const DESCRIPTION_MAX: usize = 10_000;
const TITLE_MAX: usize = 500;

fn project_name() -> ObjectBuilder {
    text(1, NAME_MAX, false)
}

fn project_description() -> ObjectBuilder {
    text(0, DESCRIPTION_MAX, true)
}

fn task_title() -> ObjectBuilder {
    text(1, TITLE_MAX, false)
}

/// In a change: null keeps the value.
fn new_project_name() -> ObjectBuilder {
    optional_text(1, NAME_MAX, false)
}

fn new_project_description() -> ObjectBuilder {
    optional_text(0, DESCRIPTION_MAX, true)
}

fn new_task_title() -> ObjectBuilder {
    optional_text(1, TITLE_MAX, false)
}

impl NewProject {
    fn validate(mut self) -> Result<Self, ApiError> {
        Validator::default()
            .text("name", &self.name, 1, NAME_MAX, false)
            .text("description", &self.description, 0, DESCRIPTION_MAX, true)
            .finish()?;
        self.name = self.name.trim().to_owned();
        Ok(self)
    }
}

impl ProjectChanges {
    fn validate(mut self) -> Result<Self, ApiError> {
        let mut v = Validator::default();
        if let Some(name) = &self.name {
            v.text("name", name, 1, NAME_MAX, false);
        }
        if let Some(description) = &self.description {
            v.text("description", description, 0, DESCRIPTION_MAX, true);
        }
        v.finish()?;
        self.name = self.name.map(|n| n.trim().to_owned());
        Ok(self)
    }
}

impl NewTask {
    fn validate(mut self) -> Result<Self, ApiError> {
        Validator::default().text("title", &self.title, 1, TITLE_MAX, false).finish()?;
        self.title = self.title.trim().to_owned();
        Ok(self)
    }
}

impl TaskChanges {
    fn validate(mut self) -> Result<Self, ApiError> {
        let mut v = Validator::default();
        if let Some(title) = &self.title {
            v.text("title", title, 1, TITLE_MAX, false);
        }
        v.finish()?;
        self.title = self.title.map(|t| t.trim().to_owned());
        Ok(self)
    }
}

// ---- store: every function takes the tenant-scoped connection ----

/// Counts the projects quota. Runs on the tenant-scoped connection the
/// reserving request holds (`projects` is found through its `search_path`).
pub struct ProjectCount;

impl plinth_access::quota::Counter for ProjectCount {
    fn count<'a>(
        &'a self,
        conn: &'a diesel_async::AsyncPgConnection,
        _tenant: plinth_tenants::TenantId,
    ) -> futures_util::future::BoxFuture<'a, QueryResult<i64>> {
        Box::pin(async move {
            let mut conn = conn;
            projects::table.count().get_result(&mut conn).await
        })
    }
}

pub async fn list_projects(conn: &mut TenantConn<'_>, page: PageRequest) -> QueryResult<Vec<Project>> {
    let mut query =
        projects::table.select(Project::as_select()).order(projects::id.asc()).limit(page.limit + 1).into_boxed();
    if let Some(after) = page.after {
        query = query.filter(projects::id.gt(after));
    }
    query.load(conn.pg()).await
}

pub async fn create_project(conn: &mut TenantConn<'_>, new: NewProject) -> QueryResult<Project> {
    let now = Utc::now();
    let project = Project {
        id: ProjectId::new(),
        name: new.name,
        description: new.description,
        created_at: now,
        updated_at: now,
    };
    diesel::insert_into(projects::table).values(&project).returning(Project::as_returning()).get_result(conn.pg()).await
}

/// The read of one project, the read path every benchmark measures: one
/// statement in one round trip ([`plinth_tenants::Db::tenant_read`]).
pub const PROJECT_BY_ID: TenantSql =
    TenantSql("SELECT id, name, description, created_at, updated_at FROM {schema}.projects WHERE id = $1");

pub async fn update_project(
    conn: &mut TenantConn<'_>,
    id: ProjectId,
    changes: ProjectChanges,
) -> QueryResult<Option<Project>> {
    diesel::update(projects::table.find(id))
        .set((&changes, projects::updated_at.eq(Utc::now())))
        .returning(Project::as_returning())
        .get_result(conn.pg())
        .await
        .optional()
}

pub async fn delete_project(conn: &mut TenantConn<'_>, id: ProjectId) -> QueryResult<bool> {
    Ok(diesel::delete(projects::table.find(id)).execute(conn.pg()).await? > 0)
}

/// The tasks of a project, or `None` if the project does not exist.
pub async fn list_tasks(
    conn: &mut TenantConn<'_>,
    project: ProjectId,
    page: PageRequest,
) -> QueryResult<Option<Vec<Task>>> {
    let exists: bool = diesel::select(diesel::dsl::exists(projects::table.find(project))).get_result(conn.pg()).await?;
    if !exists {
        return Ok(None);
    }
    let mut query = tasks::table
        .filter(tasks::project_id.eq(project))
        .select(Task::as_select())
        .order(tasks::id.asc())
        .limit(page.limit + 1)
        .into_boxed();
    if let Some(after) = page.after {
        query = query.filter(tasks::id.gt(after));
    }
    query.load(conn.pg()).await.map(Some)
}

/// Adds a task, or `None` if the project does not exist.
pub async fn create_task(conn: &mut TenantConn<'_>, project: ProjectId, new: NewTask) -> QueryResult<Option<Task>> {
    // Lock the project row so a concurrent delete cannot orphan the insert.
    let exists = projects::table
        .find(project)
        .select(projects::id)
        .for_share()
        .first::<ProjectId>(conn.pg())
        .await
        .optional()?;
    if exists.is_none() {
        return Ok(None);
    }
    let now = Utc::now();
    let task = Task {
        id: TaskId::new(),
        project_id: project,
        title: new.title,
        done: new.done,
        created_at: now,
        updated_at: now,
    };
    diesel::insert_into(tasks::table)
        .values(&task)
        .returning(Task::as_returning())
        .get_result(conn.pg())
        .await
        .map(Some)
}

pub async fn update_task(conn: &mut TenantConn<'_>, id: TaskId, changes: TaskChanges) -> QueryResult<Option<Task>> {
    diesel::update(tasks::table.find(id))
        .set((&changes, tasks::updated_at.eq(Utc::now())))
        .returning(Task::as_returning())
        .get_result(conn.pg())
        .await
        .optional()
}

pub async fn delete_task(conn: &mut TenantConn<'_>, id: TaskId) -> QueryResult<bool> {
    Ok(diesel::delete(tasks::table.find(id)).execute(conn.pg()).await? > 0)
}

// ---- routes ----

requirements! {
    /// Reading projects and tasks: viewers and up, on every plan.
    ReadProjects = "projects", Read, feature: none;
    /// Creating and editing projects: members and up (creating counts
    /// against the plan's `projects` limit).
    WriteProjects = "projects", Write, feature: none;
    DeleteProjects = "projects", Delete, feature: none;
    ReadTasks = "tasks", Read, feature: none;
    WriteTasks = "tasks", Write, feature: none;
    DeleteTasks = "tasks", Delete, feature: none;
    /// `GET /v1/export`: every project with its tasks, for admins on plans
    /// with `data_export`.
    Export = "export", Manage, feature: "data_export";
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(export_route)
        .service(list_projects_route)
        .service(create_project_route)
        .service(get_project_route)
        .service(update_project_route)
        .service(delete_project_route)
        .service(list_tasks_route)
        .service(create_task_route)
        .service(update_task_route)
        .service(delete_task_route);
}

/// An id in a path that does not parse names nothing: 404, like an unknown id.
fn parse_id<T: std::str::FromStr>(raw: &str, what: &'static str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound(what))
}

#[derive(Serialize, ToSchema)]
struct ExportedProject {
    #[serde(flatten)]
    project: Project,
    tasks: Vec<Task>,
}

/// Everything the tenant's product data holds.
#[derive(Serialize, ToSchema)]
struct TenantExport {
    /// The tenant's slug.
    tenant: String,
    projects: Vec<ExportedProject>,
}

/// Every project with its tasks (admins, on plans with `data_export`).
#[utoipa::path(
    operation_id = "export",
    tag = "projects",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = TenantExport), PlanLimits),
)]
#[get("/v1/export")]
async fn export_route(ctx: Allowed<Export>) -> Result<HttpResponse, ApiError> {
    let (projects, tasks) = ctx
        .view(async |c| {
            let projects = projects::table.select(Project::as_select()).order(projects::id.asc()).load(c.pg()).await?;
            let tasks = tasks::table.select(Task::as_select()).order(tasks::id.asc()).load(c.pg()).await?;
            Ok::<_, ApiError>((projects, tasks))
        })
        .await?;
    let mut by_project: std::collections::HashMap<ProjectId, Vec<Task>> = std::collections::HashMap::new();
    for task in tasks {
        by_project.entry(task.project_id).or_default().push(task);
    }
    let projects: Vec<_> = projects
        .into_iter()
        .map(|project| ExportedProject { tasks: by_project.remove(&project.id).unwrap_or_default(), project })
        .collect();
    Ok(HttpResponse::Ok().json(TenantExport { tenant: ctx.tenant.slug.clone(), projects }))
}

/// The tenant's projects, oldest first.
#[utoipa::path(
    operation_id = "list_projects",
    tag = "projects",
    params(TenantHeader, PageQuery),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Page<Project>)),
)]
#[get("/v1/projects")]
async fn list_projects_route(
    ctx: Allowed<ReadProjects>,
    query: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let page = query.validate()?;
    let rows = ctx.view(async |c| Ok::<_, ApiError>(list_projects(c, page).await?)).await?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |p| p.id.0)))
}

/// Creates a project (members and up; counts against the plan's `projects` limit).
#[utoipa::path(
    operation_id = "create_project",
    tag = "projects",
    params(TenantHeader, IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = NewProject,
    responses(
        (status = 201, body = Project, links(
            ("GetProject" = (operation_id = "get_project", parameters(("id" = "$response.body#/id")))),
            ("UpdateProject" = (operation_id = "update_project", parameters(("id" = "$response.body#/id")))),
            ("DeleteProject" = (operation_id = "delete_project", parameters(("id" = "$response.body#/id")))),
            ("ListTasks" = (operation_id = "list_tasks", parameters(("id" = "$response.body#/id")))),
            ("CreateTask" = (operation_id = "create_task", parameters(("id" = "$response.body#/id")))),
        )),
        PlanLimits,
        KeyReuse,
    ),
)]
#[post("/v1/projects")]
async fn create_project_route(
    ctx: Allowed<WriteProjects>,
    db: web::Data<Db>,
    body: Json<NewProject>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    let new = body.0.validate()?;
    let keyed = key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    idempotency::once_on(&db, &ctx.tenant.shard, keyed, async || {
        let json = ctx
            .tx(async |c| {
                idempotency::claim(c.pg(), keyed).await?;
                ctx.reserve(c.pg(), Quota::Projects).await?;
                let project = create_project(c, new).await?;
                idempotency::record(c.pg(), keyed, StatusCode::CREATED, &project).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

/// One project.
#[utoipa::path(
    operation_id = "get_project",
    tag = "projects",
    params(TenantHeader, ("id" = ProjectId, Path, description = "The project.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Project), NotFound),
)]
#[get("/v1/projects/{id}")]
async fn get_project_route(ctx: Allowed<ReadProjects>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id: ProjectId = parse_id(&path, "project")?;
    let project =
        ctx.read::<_, Project, ApiError>(PROJECT_BY_ID, |q| q.bind::<diesel::sql_types::Uuid, _>(id)).await?.pop();
    Ok(HttpResponse::Ok().json(project.ok_or(ApiError::NotFound("project"))?))
}

/// Changes a project's name or description (members and up).
#[utoipa::path(
    operation_id = "update_project",
    tag = "projects",
    params(TenantHeader, ("id" = ProjectId, Path, description = "The project.")),
    security(("session" = []), ("api_key" = [])),
    request_body = ProjectChanges,
    responses((status = 200, body = Project), NotFound),
)]
#[patch("/v1/projects/{id}")]
async fn update_project_route(
    ctx: Allowed<WriteProjects>,
    path: web::Path<String>,
    body: Json<ProjectChanges>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "project")?;
    let changes = body.0.validate()?;
    let project = ctx.tx(async |c| Ok::<_, ApiError>(update_project(c, id, changes).await?)).await?;
    Ok(HttpResponse::Ok().json(project.ok_or(ApiError::NotFound("project"))?))
}

/// Deletes a project and its tasks (admins and up).
#[utoipa::path(
    operation_id = "delete_project",
    tag = "projects",
    params(TenantHeader, ("id" = ProjectId, Path, description = "The project.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Deleted."), NotFound),
)]
#[delete("/v1/projects/{id}")]
async fn delete_project_route(ctx: Allowed<DeleteProjects>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "project")?;
    let deleted = ctx.tx(async |c| Ok::<_, ApiError>(delete_project(c, id).await?)).await?;
    if deleted { Ok(HttpResponse::NoContent().finish()) } else { Err(ApiError::NotFound("project")) }
}

/// A project's tasks, oldest first.
#[utoipa::path(
    operation_id = "list_tasks",
    tag = "projects",
    params(TenantHeader, ("id" = ProjectId, Path, description = "The project."), PageQuery),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Page<Task>), NotFound),
)]
#[get("/v1/projects/{id}/tasks")]
async fn list_tasks_route(
    ctx: Allowed<ReadTasks>,
    path: web::Path<String>,
    query: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let project = parse_id(&path, "project")?;
    let page = query.validate()?;
    let rows = ctx.view(async |c| Ok::<_, ApiError>(list_tasks(c, project, page).await?)).await?;
    let rows = rows.ok_or(ApiError::NotFound("project"))?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |t| t.id.0)))
}

/// Adds a task to a project (members and up).
#[utoipa::path(
    operation_id = "create_task",
    tag = "projects",
    params(TenantHeader, ("id" = ProjectId, Path, description = "The project."), IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = NewTask,
    responses(
        (status = 201, body = Task, links(
            ("UpdateTask" = (operation_id = "update_task", parameters(("id" = "$response.body#/id")))),
            ("DeleteTask" = (operation_id = "delete_task", parameters(("id" = "$response.body#/id")))),
        )),
        NotFound,
        (status = 402, description = "Error: quota_exceeded (the plan's hard limit of tasks this month is reached).", body = plinth_http::openapi::ErrorEnvelope),
        KeyReuse,
    ),
)]
#[post("/v1/projects/{id}/tasks")]
async fn create_task_route(
    ctx: Allowed<WriteTasks>,
    db: web::Data<Db>,
    path: web::Path<String>,
    body: Json<NewTask>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    let project = parse_id(&path, "project")?;
    let new = body.0.validate()?;
    let keyed = key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    idempotency::once_on(&db, &ctx.tenant.shard, keyed, async || {
        let json = ctx
            .tx(async |c| {
                idempotency::claim(c.pg(), keyed).await?;
                let task = create_task(c, project, new).await?.ok_or(ApiError::NotFound("project"))?;
                // A plan that meters tasks counts this one, with the task.
                plinth_billing::usage::record(c.pg(), ctx.tenant.id, ctx.plan(), "tasks", 1).await?;
                idempotency::record(c.pg(), keyed, StatusCode::CREATED, &task).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

/// Changes a task's title or whether it is done (members and up).
#[utoipa::path(
    operation_id = "update_task",
    tag = "tasks",
    params(TenantHeader, ("id" = TaskId, Path, description = "The task.")),
    security(("session" = []), ("api_key" = [])),
    request_body = TaskChanges,
    responses((status = 200, body = Task), NotFound),
)]
#[patch("/v1/tasks/{id}")]
async fn update_task_route(
    ctx: Allowed<WriteTasks>,
    path: web::Path<String>,
    body: Json<TaskChanges>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "task")?;
    let changes = body.0.validate()?;
    let task = ctx.tx(async |c| Ok::<_, ApiError>(update_task(c, id, changes).await?)).await?;
    Ok(HttpResponse::Ok().json(task.ok_or(ApiError::NotFound("task"))?))
}

/// Deletes a task (admins and up).
#[utoipa::path(
    operation_id = "delete_task",
    tag = "tasks",
    params(TenantHeader, ("id" = TaskId, Path, description = "The task.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Deleted."), NotFound),
)]
#[delete("/v1/tasks/{id}")]
async fn delete_task_route(ctx: Allowed<DeleteTasks>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "task")?;
    let deleted = ctx.tx(async |c| Ok::<_, ApiError>(delete_task(c, id).await?)).await?;
    if deleted { Ok(HttpResponse::NoContent().finish()) } else { Err(ApiError::NotFound("task")) }
}
