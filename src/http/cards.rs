//! SillyTavern card endpoints: import (PNG, JSON, CharX; raw body or multipart with one or more
//! files), export (png, json, charx, nextchat-mask) and the lorebook.

use super::extract::{self, Auth, MaybeAuth};
use super::AppState;
use crate::cards::{self, CardFormat, CardLimits};
use crate::characters::CharacterPatch;
use crate::error::ApiError;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

fn format_name(f: CardFormat) -> &'static str {
    match f {
        CardFormat::Png => "png",
        CardFormat::Json => "json",
        CardFormat::Charx => "charx",
    }
}

async fn import_one(
    state: &AppState,
    user: &crate::auth::User,
    bytes: &[u8],
) -> Result<Value, ApiError> {
    let card = cards::import_card(bytes, &CardLimits::default())?;
    let meta = json!({
        "format": format_name(card.format),
        "spec": card.spec.as_str(),
        "warnings": card.warnings,
    });
    let created = state.characters.create_from_card(user, card).await?;
    let mut v = serde_json::to_value(&created).map_err(ApiError::internal)?;
    v["import"] = meta;
    Ok(v)
}

/// `POST /api/characters/import`.
#[utoipa::path(
    post,    operation_id = "importCard",

    path = "/api/characters/import",
    tag = "cards",
    request_body(content((Vec<u8> = "image/png"), (serde_json::Value = "application/json"), (Vec<u8> = "application/zip"), (Vec<u8> = "multipart/form-data")), description = "A SillyTavern card: PNG (chara/ccv3 tEXt), JSON (V1/V2/V3) or CharX; multipart `file` parts for several"),
    responses((status = 201, description = "The imported character", body = crate::model::Character), (status = 207, description = "Multipart: one result per file (`file`, `status`, `character` or `error`)", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 413, description = "file too large", body = crate::error::ErrorEnvelope), (status = 415, description = "unsupported body type", body = crate::error::ErrorEnvelope), (status = 422, description = "not a readable card", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn import(
    State(state): State<AppState>,
    Auth(user): Auth,
    req: Request,
) -> Result<Response, ApiError> {
    let files = extract::uploads(req, &state, &["file", "avatar"]).await?;
    match files.as_slice() {
        [] => Err(ApiError::validation(
            "file",
            "send a card file (PNG, JSON or CharX)",
        )),
        [(_, bytes)] => {
            if bytes.is_empty() {
                return Err(ApiError::validation(
                    "body",
                    "send a card file (PNG, JSON or CharX)",
                ));
            }
            let v = import_one(&state, &user, bytes).await?;
            Ok((StatusCode::CREATED, Json(v)).into_response())
        }
        _ => {
            // Each file succeeds or fails on its own (a 207 Multi-Status summary).
            let request_id = super::request_id::current();
            let mut results = Vec::with_capacity(files.len());
            for (name, bytes) in &files {
                results.push(match import_one(&state, &user, bytes).await {
                    Ok(c) => json!({"file": name, "status": 201, "character": c}),
                    Err(e) => json!({"file": name, "status": e.code.status().as_u16(), "error": e.envelope(&request_id)["error"]}),
                });
            }
            Ok((
                StatusCode::MULTI_STATUS,
                Json(json!({ "results": results })),
            )
                .into_response())
        }
    }
}

fn safe_file_name(name: &str, ext: &str) -> String {
    let base: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = base.trim();
    format!("{}.{ext}", if base.is_empty() { "character" } else { base })
}

/// `GET /api/characters/{id}/export?format=png|json|charx|nextchat-mask[&spec=v2]`.
#[utoipa::path(
    get,    operation_id = "exportCard",

    path = "/api/characters/{id}/export",
    tag = "cards",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("format" = Option<String>, Query, description = "png (default), json, charx or nextchat-mask"), ("spec" = Option<String>, Query, description = "v2 for a V2 card instead of V3")),
    responses((status = 200, description = "The card file (Content-Disposition names it)", content((Vec<u8> = "image/png"), (serde_json::Value = "application/json"), (Vec<u8> = "application/zip"))), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 403, description = "another user's private character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security((), ("bearer" = []))
)]
pub async fn export(
    State(state): State<AppState>,
    MaybeAuth(user): MaybeAuth,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let c = state.characters.get(&id, user.as_ref())?;
    let format = params.get("format").map(String::as_str).unwrap_or("png");
    let avatar = match state.characters.get_avatar(&id, user.as_ref()).await {
        Ok(a) => Some(a),
        Err(e) if e.code == crate::error::ErrorCode::NotFound => None,
        Err(e) => return Err(e),
    };
    let (bytes, content_type, ext) = match format {
        "png" => {
            let png = avatar
                .as_ref()
                .filter(|a| a.content_type == "image/png")
                .map(|a| a.bytes.as_slice());
            (cards::export_png(&c, png)?, "image/png", "png")
        }
        "json" => {
            let v = match params.get("spec").map(String::as_str) {
                None | Some("v3") => cards::to_v3_json(&c),
                Some("v2") => cards::to_v2_json(&c),
                Some(_) => return Err(ApiError::validation("spec", "must be v2 or v3")),
            };
            (
                serde_json::to_vec_pretty(&v).map_err(ApiError::internal)?,
                "application/json",
                "json",
            )
        }
        "charx" => {
            let icon = avatar.as_ref().map(|a| {
                let ext = a.content_type.rsplit('/').next().unwrap_or("png");
                (a.bytes.as_slice(), if ext == "jpeg" { "jpg" } else { ext })
            });
            (cards::export_charx(&c, icon)?, "application/zip", "charx")
        }
        "nextchat-mask" => {
            let slug = c.slug.clone().unwrap_or_else(|| c.id.clone());
            let v = cards::export_nextchat_mask(&c, &slug, c.avatar.as_deref());
            (
                serde_json::to_vec_pretty(&v).map_err(ApiError::internal)?,
                "application/json",
                "json",
            )
        }
        _ => {
            return Err(ApiError::validation(
                "format",
                "must be png, json, charx or nextchat-mask",
            ))
        }
    };
    let file = safe_file_name(&c.name, ext);
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /api/characters/{id}/lorebook[?format=worldinfo]`.
#[utoipa::path(
    get,    operation_id = "getLorebook",

    path = "/api/characters/{id}/lorebook",
    tag = "cards",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("format" = Option<String>, Query, description = "worldinfo for a SillyTavern World Info file; default the card `character_book`")),
    responses((status = 200, description = "The lorebook", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 403, description = "another user's private character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security((), ("bearer" = []))
)]
pub async fn get_lorebook(
    State(state): State<AppState>,
    MaybeAuth(user): MaybeAuth,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let c = state.characters.get(&id, user.as_ref())?;
    let book = c.personality.character_book.clone().unwrap_or_default();
    Ok(Json(match params.get("format").map(String::as_str) {
        None | Some("character_book") => serde_json::to_value(&book).map_err(ApiError::internal)?,
        Some("worldinfo") => cards::lorebook_to_worldinfo(&book),
        Some(_) => {
            return Err(ApiError::validation(
                "format",
                "must be character_book or worldinfo",
            ))
        }
    }))
}

/// `PUT /api/characters/{id}/lorebook?mode=replace|merge`: a World Info file, a card
/// `character_book`, or `{spec:"lorebook_v3"}`.
#[utoipa::path(
    put,    operation_id = "putLorebook",

    path = "/api/characters/{id}/lorebook",
    tag = "cards",
    params(("id" = String, Path, description = "Character id (UUID v7)"), ("mode" = Option<String>, Query, description = "replace (default) or merge")),
    request_body(content = serde_json::Value, description = "A World Info file, a card `character_book`, or `{spec: \"lorebook_v3\"}`"),
    responses((status = 200, description = "The stored lorebook", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope), (status = 422, description = "not a readable lorebook", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn put_lorebook(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    extract::JsonBody(body): extract::JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let merge = match params.get("mode").map(String::as_str) {
        None | Some("replace") => false,
        Some("merge") => true,
        Some(_) => return Err(ApiError::validation("mode", "must be replace or merge")),
    };
    let current = state.characters.get_editable(&id, &user)?;
    let incoming = cards::parse_lorebook(&body)?;
    let book = match (&current.personality.character_book, merge) {
        (Some(existing), true) => cards::merge_lorebooks(existing.clone(), incoming),
        _ => incoming,
    };
    let mut fields = Map::new();
    fields.insert(
        "characterBook".into(),
        serde_json::to_value(&book).map_err(ApiError::internal)?,
    );
    let patch = CharacterPatch {
        version: current.version,
        personality: Some(fields),
        ..CharacterPatch::default()
    };
    let updated = state.characters.update(&id, &user, patch).await?;
    Ok(Json(json!({
        "characterBook": updated.personality.character_book,
        "version": updated.version,
        "entries": updated.personality.character_book.as_ref().map(|b| b.entries.len()).unwrap_or(0),
    })))
}
