//! Memory Management API handlers: `GET` and `POST /api/characters/{id}/memory`. Parse,
//! authorize through `MemoryService`, serialize the spec's camelCase shapes.

use super::extract::{Auth, JsonBody};
use super::AppState;
use crate::error::ApiError;
use crate::memory::types::{ConversationMemory, MemorySummary};
use crate::memory::{MemoryInput, MemoryOperation, MemoryQuery, MemoryStatistics};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// MemoryUpdateRequest.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = MemoryUpdateRequest)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    memory: Option<MemoryBody>,
    operation: Option<String>,
}

/// A ConversationMemory as sent. Read-only fields (`createdAt`, `recallCount`, …) are accepted
/// so a client can send back an entry it read, and ignored.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(as = MemoryInput)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryBody {
    id: Option<String>,
    content: Option<String>,
    kind: Option<String>,
    importance: Option<f64>,
    tags: Option<Vec<String>>,
    scope: Option<String>,
    conversation_id: Option<String>,
    #[schema(ignore)]
    #[serde(default, rename = "source")]
    _source: Option<IgnoredAny>,
    #[schema(ignore)]
    #[serde(default, rename = "createdAt")]
    _created_at: Option<IgnoredAny>,
    #[schema(ignore)]
    #[serde(default, rename = "updatedAt")]
    _updated_at: Option<IgnoredAny>,
    #[schema(ignore)]
    #[serde(default, rename = "lastRecalledAt")]
    _last_recalled_at: Option<IgnoredAny>,
    #[schema(ignore)]
    #[serde(default, rename = "recallCount")]
    _recall_count: Option<IgnoredAny>,
    #[schema(ignore)]
    #[serde(default, rename = "tokens")]
    _tokens: Option<IgnoredAny>,
}

fn parse_usize(q: &HashMap<String, String>, name: &str) -> Result<Option<usize>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ApiError::validation(name, "must be a non-negative integer")),
    }
}

/// The wire shape of one entry.
pub fn memory_json(m: &ConversationMemory) -> Value {
    let mut v = json!({
        "id": m.id,
        "content": m.content,
        "kind": m.kind.as_str(),
        "importance": m.importance,
        "tags": m.tags,
        "scope": m.scope.as_str(),
        "source": m.source,
        "createdAt": m.created_at,
        "updatedAt": m.updated_at,
        "lastRecalledAt": m.last_recalled_at,
        "recallCount": m.recall_count,
        "tokens": m.tokens,
    });
    if let (Some(cid), Some(obj)) = (&m.conversation_id, v.as_object_mut()) {
        obj.insert("conversationId".into(), json!(cid));
    }
    v
}

fn summary_json(s: &MemorySummary) -> Value {
    json!({
        "content": s.content,
        "conversationId": s.conversation_id,
        "lastSummarizedMessage": s.last_summarized_message,
        "updatedAt": s.updated_at,
        "tokens": s.tokens,
    })
}

fn statistics_json(s: &MemoryStatistics) -> Value {
    json!({
        "byKind": s.by_kind,
        "byScope": s.by_scope,
        "total": s.total,
        "totalTokens": s.total_tokens,
        "lastSummarizedMessage": s.last_summarized_message,
        "lastRecallAt": s.last_recall_at,
    })
}

/// `GET /api/characters/{id}/memory?scope=&kind=&search=&limit=&offset=&conversationId=`.
#[utoipa::path(
    get,    operation_id = "listMemory",

    path = "/api/characters/{id}/memory",
    tag = "memory",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("scope" = Option<String>, Query, description = "conversation, user or character"), ("kind" = Option<String>, Query, description = "memory kind"), ("search" = Option<String>, Query, description = "BM25 search text"), ("conversationId" = Option<String>, Query, description = "only this conversation's memories"), ("limit" = Option<u32>, Query, description = "page size"), ("offset" = Option<u32>, Query, description = "items to skip")),
    responses((status = 200, description = "`{memories: [ConversationMemory], total, hasMore, statistics}`", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "not a viewer of the character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = MemoryQuery {
        scope: q.get("scope").cloned(),
        kind: q.get("kind").cloned(),
        search: q.get("search").or_else(|| q.get("query")).cloned(),
        conversation_id: q.get("conversationId").cloned(),
        limit: parse_usize(&q, "limit")?,
        offset: parse_usize(&q, "offset")?,
    };
    let view = state.memory.list(&user, &id, query).await?;
    let body = json!({
        "memory": view.memory.iter().map(memory_json).collect::<Vec<_>>(),
        "summary": summary_json(&view.summary),
        "statistics": statistics_json(&view.statistics),
    });
    Ok(Json(body).into_response())
}

/// `POST /api/characters/{id}/memory` with `{memory, operation}`: 201 with the new entry for
/// `add`, 200 with the changed (or removed) entry otherwise.
#[utoipa::path(
    post,    operation_id = "updateMemory",

    path = "/api/characters/{id}/memory",
    tag = "memory",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    request_body = crate::http::memory::UpdateRequest,
    responses((status = 201, description = "Added; the new entry", body = crate::memory::types::ConversationMemory), (status = 200, description = "Updated or removed; the entry", body = crate::memory::types::ConversationMemory), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "shared memory needs the owner or an admin", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character or memory", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateRequest>,
) -> Result<Response, ApiError> {
    let op = req
        .operation
        .as_deref()
        .ok_or_else(|| ApiError::validation("operation", "is required: add, update or remove"))?;
    let operation = MemoryOperation::parse(op)?;
    let body = req
        .memory
        .ok_or_else(|| ApiError::validation("memory", "is required"))?;
    let input = MemoryInput {
        id: body.id,
        content: body.content,
        kind: body.kind,
        importance: body.importance,
        tags: body.tags,
        scope: body.scope,
        conversation_id: body.conversation_id,
    };
    let entry = state.memory.apply(&user, &id, operation, input).await?;
    let status = match operation {
        MemoryOperation::Add => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let body = json!({ "operation": op, "memory": memory_json(&entry) });
    Ok((status, Json(body)).into_response())
}
