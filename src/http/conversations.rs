//! Conversation endpoints: listing, reading (paginated messages), deleting, editing messages,
//! choosing swipes, and SillyTavern chat JSONL import/export.

use super::extract::{self, Auth, JsonBody};
use super::AppState;
use crate::conversations::encode_cursor;
use crate::error::{ApiError, ErrorCode};
use crate::model::{Conversation, MessageRole, StoredMessage};
use crate::store::History;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// A stored message in the spec's UserMessage / CharacterMessage / SystemMessage shape.
pub fn message_json(m: &StoredMessage, conv: &Conversation) -> Value {
    let mut v = json!({
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "timestamp": m.timestamp,
        "conversationId": conv.id,
        "characterId": conv.character_id,
    });
    if m.role == MessageRole::Character {
        v["characterName"] = json!(m.name);
        v["generated"] = json!(m.generated);
        if let Some(model) = &m.model {
            v["model"] = json!(model);
        }
        if let Some(usage) = &m.usage {
            v["usage"] = json!(usage);
        }
    }
    if m.role == MessageRole::System {
        v["type"] = json!("notice");
    }
    let mut meta = json!({ "seq": m.seq, "name": m.name });
    if !m.swipes.is_empty() {
        meta["swipes"] = json!(m.swipes);
        meta["swipeId"] = json!(m.swipe_id);
    }
    if let Some(reason) = &m.finish_reason {
        meta["finishReason"] = json!(reason);
    }
    if !m.extra.is_empty() {
        meta["extra"] = json!(m.extra);
    }
    v["metadata"] = meta;
    v
}

/// The spec's ConversationContext for a history.
pub fn context_json(h: &History) -> Value {
    let c = &h.conversation;
    json!({
        "conversationId": c.id,
        "characterId": c.character_id,
        "userId": c.user_id,
        "messages": h.messages.iter().map(|m| message_json(m, c)).collect::<Vec<_>>(),
        "currentMes": h.messages.len(),
        "memory": [],
        "sessionId": c.id,
        "startedAt": c.started_at,
        "lastActivity": c.last_activity,
        "settings": { "userName": c.user_name },
        "characterState": c.character_state,
    })
}

fn summary_json(c: &Conversation) -> Value {
    json!({
        "id": c.id,
        "conversationId": c.id,
        "characterId": c.character_id,
        "userId": c.user_id,
        "title": c.title,
        "startedAt": c.started_at,
        "lastActivity": c.last_activity,
        "messageCount": c.message_count,
    })
}

fn parse_limit(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get("limit") {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::validation("limit", format!("must be an integer from 1 to {max}"))
            }),
        None => Ok(default),
    }
}

fn parse_bool(params: &HashMap<String, String>, key: &str) -> Result<bool, ApiError> {
    match params.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(_) => Err(ApiError::validation(key, "must be true or false")),
    }
}

/// `GET /api/characters/{id}/conversations?limit&before&context`.
#[utoipa::path(
    get,    operation_id = "listConversations",

    path = "/api/characters/{id}/conversations",
    tag = "conversations",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("limit" = Option<u32>, Query, description = "page size, 1–100 (default 20)"), ("before" = Option<String>, Query, description = "cursor from nextCursor"), ("context" = Option<bool>, Query, description = "include each conversation's context")),
    responses((status = 200, description = "`{conversations, hasMore, nextCursor}`", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(&params, 20, 100)?;
    let with_context = parse_bool(&params, "context")?;
    let page = state
        .conversations
        .list(&user, &id, params.get("before").map(String::as_str), limit)
        .await?;
    let mut items = Vec::with_capacity(page.conversations.len());
    for c in &page.conversations {
        let mut v = summary_json(c);
        if with_context {
            let h = state.conversations.load_owned(&c.id, &user)?;
            v["context"] = context_json(&h);
        }
        items.push(v);
    }
    Ok(Json(json!({
        "conversations": items,
        "hasMore": page.next.is_some(),
        "nextCursor": page.next.map(encode_cursor),
    })))
}

/// `GET /api/conversations/{cid}?limit&before`: messages newest page first, each page oldest
/// to newest; `before` is a message seq.
#[utoipa::path(
    get,    operation_id = "getConversation",

    path = "/api/conversations/{cid}",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id"), ("limit" = Option<u32>, Query, description = "messages per page, 1–200 (default 50)"), ("before" = Option<u64>, Query, description = "only messages with a lower seq")),
    responses((status = 200, description = "The conversation with a page of messages (`messages`, `hasMore`, `nextBefore`, `characterState`)", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation for this user", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(cid): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(&params, 50, 200)?;
    let before = match params.get("before") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::validation("before", "must be a message seq (integer)"))?,
        ),
        None => None,
    };
    let h = state.conversations.load_owned(&cid, &user)?;
    let eligible: Vec<&StoredMessage> = h
        .messages
        .iter()
        .map(std::sync::Arc::as_ref)
        .filter(|m| before.is_none_or(|b| m.seq < b))
        .collect();
    let start = eligible.len().saturating_sub(limit);
    let page = &eligible[start..];
    let mut body = summary_json(&h.conversation);
    body["messages"] = json!(page
        .iter()
        .map(|m| message_json(m, &h.conversation))
        .collect::<Vec<_>>());
    body["hasMore"] = json!(start > 0);
    body["nextBefore"] = json!(page.first().filter(|_| start > 0).map(|m| m.seq));
    body["characterState"] = json!(h.conversation.character_state);
    Ok(Json(body))
}

/// `DELETE /api/conversations/{cid}`.
#[utoipa::path(
    delete,    operation_id = "deleteConversation",

    path = "/api/conversations/{cid}",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id")),
    responses((status = 204, description = "Deleted with its messages and memories"), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation for this user", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(cid): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.conversations.delete(&user, &cid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of a message edit.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = EditMessageRequest)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    content: String,
}

/// `PUT /api/conversations/{cid}/messages/{mid}`.
#[utoipa::path(
    put,    operation_id = "editMessage",

    path = "/api/conversations/{cid}/messages/{mid}",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id"), ("mid" = String, Path, description = "Message id")),
    request_body = EditMessage,
    responses((status = 200, description = "The edited message", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation or message", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn edit_message(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path((cid, mid)): Path<(String, String)>,
    JsonBody(body): JsonBody<EditMessage>,
) -> Result<Json<Value>, ApiError> {
    let m = state
        .conversations
        .edit_message(&user, &cid, &mid, body.content)
        .await?;
    let h = state.conversations.load_owned(&cid, &user)?;
    Ok(Json(message_json(&m, &h.conversation)))
}

/// `DELETE /api/conversations/{cid}/messages/{mid}`.
#[utoipa::path(
    delete,    operation_id = "deleteMessage",

    path = "/api/conversations/{cid}/messages/{mid}",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id"), ("mid" = String, Path, description = "Message id")),
    responses((status = 204, description = "Deleted"), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation or message", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn delete_message(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path((cid, mid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .conversations
        .delete_message(&user, &cid, &mid)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of a swipe choice.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = ChooseSwipeRequest)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChooseSwipe {
    swipe_id: usize,
}

/// `PUT /api/conversations/{cid}/messages/{mid}/swipe`.
#[utoipa::path(
    put,    operation_id = "chooseSwipe",

    path = "/api/conversations/{cid}/messages/{mid}/swipe",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id"), ("mid" = String, Path, description = "Message id")),
    request_body = ChooseSwipe,
    responses((status = 200, description = "The message showing the chosen swipe", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation, message or swipe", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn choose_swipe(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path((cid, mid)): Path<(String, String)>,
    JsonBody(body): JsonBody<ChooseSwipe>,
) -> Result<Json<Value>, ApiError> {
    let m = state
        .conversations
        .choose_swipe(&user, &cid, &mid, body.swipe_id)
        .await?;
    let h = state.conversations.load_owned(&cid, &user)?;
    Ok(Json(message_json(&m, &h.conversation)))
}

/// `GET /api/conversations/{cid}/export?format=jsonl`.
#[utoipa::path(
    get,    operation_id = "exportConversation",

    path = "/api/conversations/{cid}/export",
    tag = "conversations",
    params(("cid" = String, Path, description = "Conversation id"), ("format" = Option<String>, Query, description = "jsonl (SillyTavern chat file; the default)")),
    responses((status = 200, description = "SillyTavern chat JSONL", content_type = "application/jsonl"), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such conversation for this user", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn export(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(cid): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    match params.get("format").map(String::as_str) {
        None | Some("jsonl") => {}
        Some(_) => return Err(ApiError::validation("format", "only jsonl is supported")),
    }
    let (char_name, body) = state.conversations.export_jsonl(&user, &cid)?;
    let safe: String = char_name
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .collect();
    let file = format!(
        "{} - {}.jsonl",
        if safe.trim().is_empty() {
            "chat"
        } else {
            safe.trim()
        },
        cid
    );
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/jsonl; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", file.replace('"', "")),
            ),
        ],
        body,
    )
        .into_response())
}

/// `POST /api/characters/{id}/conversations/import`: a raw JSONL body or a multipart `file`.
#[utoipa::path(
    post,    operation_id = "importConversation",

    path = "/api/characters/{id}/conversations/import",
    tag = "conversations",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    request_body(content((String = "application/jsonl"), (Vec<u8> = "multipart/form-data")), description = "A SillyTavern chat JSONL file (raw body or multipart `file`)"),
    responses((status = 201, description = "The imported conversation", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope), (status = 413, description = "file too large", body = crate::error::ErrorEnvelope), (status = 422, description = "not a readable chat file", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn import(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let bytes = extract::uploads(req, &state, &["file", "chat"])
        .await?
        .into_iter()
        .next()
        .map(|(_, b)| b)
        .unwrap_or_default();
    if bytes.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            "chat file is empty",
        ));
    }
    let h = state.conversations.import_jsonl(&user, &id, &bytes).await?;
    let mut body = summary_json(&h.conversation);
    body["messages"] = json!(h
        .messages
        .iter()
        .map(|m| message_json(m, &h.conversation))
        .collect::<Vec<_>>());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
