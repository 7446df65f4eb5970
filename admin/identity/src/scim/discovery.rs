//! What the server supports, as SCIM clients discover it (RFC 7644 4):
//! `ServiceProviderConfig`, `ResourceTypes` and `Schemas`. The schemas
//! (`schemas.json`) are RFC 7643's User and Group, cut to the attributes
//! Plinth keeps; they were generated from the `scim2-models` package's
//! definitions of the RFC schemas.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, get, web};
use plinth_http::ApiError;
use serde_json::{Value, json};

use super::{GROUP_SCHEMA, LIST_SCHEMA, PAGE_MAX, Scim, ScimError, ScimErrors, USER_SCHEMA, answer};

pub(super) fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(service_provider_config)
        .service(resource_types)
        .service(resource_type)
        .service(list_schemas)
        .service(one_schema);
}

const SCHEMAS: &str = include_str!("schemas.json");

fn config(base: &str) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "patch": { "supported": true },
        "bulk": { "supported": false, "maxOperations": 0, "maxPayloadSize": 0 },
        "filter": { "supported": true, "maxResults": PAGE_MAX },
        "changePassword": { "supported": false },
        "sort": { "supported": false },
        "etag": { "supported": false },
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "SCIM token",
            "description": "A token a tenant admin made with POST /v1/scim/tokens: Authorization: Bearer <token>.",
            "primary": true,
        }],
        "meta": { "resourceType": "ServiceProviderConfig", "location": format!("{base}/ServiceProviderConfig") },
    })
}

fn types(base: &str) -> Vec<Value> {
    [
        ("User", "/Users", USER_SCHEMA, "The organization's members."),
        ("Group", "/Groups", GROUP_SCHEMA, "Groups, mapped to roles."),
    ]
    .into_iter()
    .map(|(id, endpoint, schema, description)| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": id,
            "name": id,
            "endpoint": endpoint,
            "description": description,
            "schema": schema,
            "schemaExtensions": [],
            "meta": { "resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/{id}") },
        })
    })
    .collect()
}

fn schema_list(base: &str) -> Result<Vec<Value>, ScimError> {
    let mut list: Vec<Value> = serde_json::from_str(SCHEMAS)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("reading the SCIM schemas")))?;
    for schema in &mut list {
        let id = schema.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
        schema["meta"] = json!({ "resourceType": "Schema", "location": format!("{base}/Schemas/{id}") });
    }
    Ok(list)
}

fn listed(resources: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": resources.len(),
        "startIndex": 1,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    })
}

/// The one resource of `list` with this `id`; 404 when none.
fn by_id(list: Vec<Value>, id: &str, what: &str) -> Result<HttpResponse, ScimError> {
    let found = list.into_iter().find(|r| r.get("id").and_then(Value::as_str) == Some(id));
    answer(StatusCode::OK, &found.ok_or_else(|| ScimError::not_found(what))?)
}

#[utoipa::path(
    operation_id = "scim_service_provider_config",
    tag = "scim",
    summary = "What this SCIM server supports: PATCH and filters; no bulk, sort, ETags or password changes",
    security(("scim_token" = [])),
    responses((status = 200, body = Object, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/ServiceProviderConfig")]
async fn service_provider_config(req: HttpRequest, ctx: Result<Scim, ApiError>) -> Result<HttpResponse, ScimError> {
    ctx?;
    answer(StatusCode::OK, &config(&super::base_url(&req)))
}

#[utoipa::path(
    operation_id = "scim_resource_types",
    tag = "scim",
    summary = "The resource types: User and Group",
    security(("scim_token" = [])),
    responses((status = 200, body = Object, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/ResourceTypes")]
async fn resource_types(req: HttpRequest, ctx: Result<Scim, ApiError>) -> Result<HttpResponse, ScimError> {
    ctx?;
    answer(StatusCode::OK, &listed(types(&super::base_url(&req))))
}

#[utoipa::path(
    operation_id = "scim_resource_type",
    tag = "scim",
    summary = "One resource type",
    params(("id" = String, Path, description = "`User` or `Group`.")),
    security(("scim_token" = [])),
    responses((status = 200, body = Object, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/ResourceTypes/{id}")]
async fn resource_type(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    id: web::Path<String>,
) -> Result<HttpResponse, ScimError> {
    ctx?;
    by_id(types(&super::base_url(&req)), &id, "resource type")
}

#[utoipa::path(
    operation_id = "scim_schemas",
    tag = "scim",
    summary = "The User and Group schemas, with the attributes Plinth keeps",
    security(("scim_token" = [])),
    responses((status = 200, body = Object, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Schemas")]
async fn list_schemas(req: HttpRequest, ctx: Result<Scim, ApiError>) -> Result<HttpResponse, ScimError> {
    ctx?;
    answer(StatusCode::OK, &listed(schema_list(&super::base_url(&req))?))
}

#[utoipa::path(
    operation_id = "scim_schema",
    tag = "scim",
    summary = "One schema",
    params(("id" = String, Path, description = "The schema's URN.")),
    security(("scim_token" = [])),
    responses((status = 200, body = Object, content_type = "application/scim+json"), ScimErrors),
)]
#[get("/scim/v2/Schemas/{id}")]
async fn one_schema(
    req: HttpRequest,
    ctx: Result<Scim, ApiError>,
    id: web::Path<String>,
) -> Result<HttpResponse, ScimError> {
    ctx?;
    by_id(schema_list(&super::base_url(&req))?, &id, "schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemas_describe_what_plinth_keeps() -> Result<(), Box<dyn std::error::Error>> {
        let list = schema_list("https://acme.example/scim/v2").map_err(|e| e.to_string())?;
        let names = |id: &str| -> Vec<String> {
            let schema = list.iter().find(|s| s["id"] == id);
            let attributes = schema.and_then(|s| s["attributes"].as_array()).cloned().unwrap_or_default();
            attributes.iter().filter_map(|a| a["name"].as_str().map(str::to_owned)).collect()
        };
        assert_eq!(names(USER_SCHEMA), ["userName", "name", "displayName", "active", "emails", "groups"]);
        assert_eq!(names(GROUP_SCHEMA), ["displayName", "members"]);
        assert_eq!(list[0]["meta"]["location"], format!("https://acme.example/scim/v2/Schemas/{USER_SCHEMA}"));
        Ok(())
    }
}
