//! The OpenAPI 3.1 description of the JSON API, served at `GET /api/v1/openapi.json`.
//!
//! It is derived from the handlers' own types with utoipa: the request and response structs of
//! [`super::api`] and [`super::audit`] derive `ToSchema`/`IntoParams`, the digest, health and
//! capabilities schemas come from `gaffer-protocol` (its `openapi` feature), and every handler
//! carries `#[utoipa::path]` with its parameters, body and statuses. [`ApiDoc::document`] adds
//! what every operation shares: the bearer security requirement and the 401, 403 and 503 answers,
//! all with the one error body [`ErrorBody`] (`{"error": "…"}`, what [`super::AppError`] sends).
//!
//! The document is public ([`super::Access::Public`]): it describes the API, holds nothing about
//! the fleet, and a client needs it before it has a token. A test checks that every `/api/v1`
//! route of [`super::ROUTES`] is in it with its method, so a route cannot be added undocumented.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr, Response as ApiResponse, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

/// The body of every error the API answers: what went wrong and what the caller can do about it.
/// Internal details are never in it (they are logged).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// The message, e.g. `"job 4b1f… not found"` or `"limit must be 1..=1000"`.
    pub(crate) error: String,
}

/// Name of the bearer-token security scheme in the document.
const BEARER: &str = "bearer";
/// Name of the dashboard's session-cookie security scheme in the document.
const SESSION_COOKIE: &str = "session_cookie";

/// The derived document. Build the full one with [`ApiDoc::document`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Gaffer control plane API",
        description = "Jobs, agents and the audit log of a Gaffer fleet. Every route needs `Authorization: Bearer gfa_…` (an API token from `gaffer-control api-token create`); reading needs any role, submit/cancel/retry `operator`, revoke and the audit log `admin`. Errors are `{\"error\": \"…\"}` with the status.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::api::list_agents,
        super::api::get_agent,
        super::api::revoke_agent,
        super::drain::api_drain,
        super::drain::api_cordon,
        super::drain::api_uncordon,
        super::api::list_jobs,
        super::api::submit_job,
        super::api::get_job,
        super::api::cancel_job,
        super::api::retry_job,
        super::export::api_export,
        super::custody::api_custody,
        super::audit::api_list,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Shared),
    tags(
        (name = "agents", description = "The fleet's agents"),
        (name = "jobs", description = "Analysis jobs and their digests"),
        (name = "audit", description = "The append-only audit log (admin)"),
    ),
)]
pub(crate) struct ApiDoc;

impl ApiDoc {
    /// The document, built once.
    pub(crate) fn document() -> &'static Document {
        static DOC: OnceLock<Document> = OnceLock::new();
        DOC.get_or_init(ApiDoc::openapi)
    }
}

/// What every operation shares: security schemes and requirement, and the answers any route can
/// give (no token, too low a role, store unavailable or request timed out).
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token, `gfa_…` (`gaffer-control api-token create --name N --role R`)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            SESSION_COOKIE,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                super::SESSION_COOKIE,
                "The dashboard's session (`__Host-gaffer_session` under HTTPS); it is for the HTML dashboard only, and the routes under /api/v1 do not accept it",
            ))),
        );
        let error = |description: &str| -> RefOr<ApiResponse> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
                .into()
        };
        for item in doc.paths.paths.values_mut() {
            let operations: [&mut Option<Operation>; 4] =
                [&mut item.get, &mut item.post, &mut item.put, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                let responses = &mut operation.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| error("No valid API token (missing, unknown, revoked or expired)"));
                responses.entry("403".into()).or_insert_with(|| error("The token's role is below the route's"));
                responses
                    .entry("503".into())
                    .or_insert_with(|| error("The store is unavailable or the request took longer than 30 s; retry"));
            }
        }
    }
}

/// `GET /api/v1/openapi.json`: the document as JSON.
pub(crate) async fn openapi_json() -> Response {
    match serde_json::to_vec(ApiDoc::document()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => super::AppError::Internal(format!("OpenAPI document: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `/api/v1` route of the route table is documented with its method (except the
    /// document itself), and the document has no operation the router does not serve.
    #[test]
    fn every_api_route_is_in_the_document_with_its_method() {
        let doc = serde_json::to_value(ApiDoc::document()).expect("the document serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        let mut routed = Vec::new();
        for spec in super::super::ROUTES.iter().filter(|r| r.path.starts_with("/api/v1/")) {
            if spec.path == "/api/v1/openapi.json" {
                continue;
            }
            let method = spec.method.as_str().to_ascii_lowercase();
            let documented = paths.get(spec.path).and_then(|p| p.get(&method));
            assert!(documented.is_some(), "{} {} is routed but not in the OpenAPI document", spec.method, spec.path);
            routed.push((spec.path.to_owned(), method));
        }
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                assert!(
                    routed.contains(&(path.clone(), method.clone())),
                    "{method} {path} is documented but not routed"
                );
            }
        }
        assert!(routed.len() >= 9, "only {} API routes found", routed.len());
    }

    /// Every operation names the bearer scheme and answers 401 and 403 with the error body, and
    /// the digest is described field by field (not as a bare object).
    #[test]
    fn operations_share_security_and_errors_and_the_digest_is_described() {
        let doc = serde_json::to_value(ApiDoc::document()).expect("the document serializes");
        assert_eq!(doc["components"]["securitySchemes"][BEARER]["scheme"], "bearer");
        assert_eq!(doc["components"]["securitySchemes"][SESSION_COOKIE]["in"], "cookie");
        assert_eq!(doc["components"]["schemas"]["ErrorBody"]["required"][0], "error");
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                assert_eq!(op["security"][0][BEARER], serde_json::json!([]), "{method} {path}");
                for status in ["401", "403"] {
                    let schema = &op["responses"][status]["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
                }
            }
        }
        let digest = &doc["components"]["schemas"]["Digest"]["properties"];
        for field in ["schema_version", "source", "technical", "shots", "moderation", "analyzers"] {
            assert!(digest.get(field).is_some(), "Digest lacks {field}: {digest}");
        }
        let shot = &doc["components"]["schemas"]["Shot"]["properties"];
        assert!(shot.get("keyframe").is_some() && shot.get("start_frame").is_some(), "{shot}");
    }
}
