//! `GET /openapi.json`: the OpenAPI 3.1 document. It is generated from the handlers'
//! `#[utoipa::path]` annotations while `utoipa_axum` registers the same handlers as routes, so a
//! route cannot exist without its documentation.

use crate::error::{ErrorBody, ErrorEnvelope};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document's fixed parts; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Taproom",
        description = "Character-chat gateway: SillyTavern characters, conversations and memory, \
                       an OpenAI-compatible surface for NextChat, streaming over SSE and WebSocket. \
                       Every error is the envelope `{error: {code, message, details?, timestamp, requestId}}`."
    ),
    modifiers(&BearerJwt),
    components(schemas(ErrorEnvelope, ErrorBody)),
    tags(
        (name = "characters", description = "Character management"),
        (name = "cards", description = "Character cards and lorebooks (SillyTavern formats)"),
        (name = "conversations", description = "Conversations and messages"),
        (name = "interact", description = "Generation: interact, regenerate, WebSocket"),
        (name = "memory", description = "Conversation memory"),
        (name = "plugins", description = "Per-character WebAssembly behaviour plugins"),
        (name = "openai", description = "OpenAI-compatible surface for NextChat and other clients"),
        (name = "ops", description = "Health, readiness, metrics, backup, upstream state"),
    )
)]
pub struct ApiDoc;

/// Name of the bearer-JWT security scheme the paths refer to.
pub const BEARER: &str = "bearer";

struct BearerJwt;

impl Modify for BearerJwt {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The serialized document, rendered once when the router is built.
#[derive(Clone)]
pub struct Document(pub Bytes);

/// `GET /openapi.json`.
#[utoipa::path(
    get,    operation_id = "openapi",

    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn document(Extension(doc): Extension<Document>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0).into_response()
}
