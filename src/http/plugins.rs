//! Plugin endpoints: a character's plugin bindings (owner or admin only) and the admin view of
//! the loaded plugins.

use super::extract::{Auth, JsonBody};
use super::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::store::{self, PluginBindingRecord};
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

fn key(id: &str) -> Result<u128, ApiError> {
    store::parse_id(id).ok_or_else(|| ApiError::character_not_found(id))
}

/// `GET /api/characters/{id}/plugins`: `[{name, config, enabled}]` in call order.
#[utoipa::path(
    get,    operation_id = "getPluginBindings",

    path = "/api/characters/{id}/plugins",
    tag = "plugins",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    responses((status = 200, description = "`{plugins: [{name, config, enabled}]}` in call order", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn get_bindings(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.characters.get_editable(&id, &user)?;
    let bindings = state.characters.store().plugin_bindings(key(&id)?)?;
    Ok(Json(json!(bindings)))
}

/// `PUT /api/characters/{id}/plugins`: replaces the bindings; each config is validated against
/// its plugin's schema.
#[utoipa::path(
    put,    operation_id = "putPluginBindings",

    path = "/api/characters/{id}/plugins",
    tag = "plugins",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    request_body = Vec<crate::store::PluginBindingRecord>,
    responses((status = 200, description = "The stored bindings", body = serde_json::Value), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn put_bindings(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    JsonBody(bindings): JsonBody<Vec<PluginBindingRecord>>,
) -> Result<Json<Value>, ApiError> {
    state.characters.get_editable(&id, &user)?;
    for (i, b) in bindings.iter().enumerate() {
        if state.plugins.manifest(&b.name).is_none() {
            return Err(ApiError::validation(
                &format!("[{i}].name"),
                format!(
                    "plugin {:?} is not loaded; loaded: {:?}",
                    b.name,
                    state.plugins.names()
                ),
            ));
        }
        state
            .plugins
            .validate_binding(&b.name, &b.config)
            .map_err(|why| ApiError::validation(&format!("[{i}].config"), why))?;
        if bindings[..i].iter().any(|o| o.name == b.name) {
            return Err(ApiError::validation(
                &format!("[{i}].name"),
                "a plugin may be bound once",
            ));
        }
    }
    let store = state.characters.store().clone();
    let k = key(&id)?;
    let to_store = bindings.clone();
    crate::characters::blocking(move || store.set_plugin_bindings(k, &to_store)).await?;
    Ok(Json(json!(bindings)))
}

/// `GET /api/admin/plugins`: loaded plugins, versions, call counts, durations, traps.
#[utoipa::path(
    get,    operation_id = "adminPlugins",

    path = "/api/admin/plugins",
    tag = "plugins",
    responses((status = 200, description = "`{plugins: [PluginStats]}`", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "admin only", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn admin_stats(
    State(state): State<AppState>,
    Auth(user): Auth,
) -> Result<Json<Value>, ApiError> {
    if !user.admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "admin only"));
    }
    Ok(Json(json!({ "plugins": state.plugins.stats() })))
}

/// `POST /api/admin/plugins/reload`: recompiles the plugins dir; calls in flight finish on the
/// old set, and a broken set leaves the old one in place.
#[utoipa::path(
    post,    operation_id = "reloadPlugins",

    path = "/api/admin/plugins/reload",
    tag = "plugins",
    responses((status = 200, description = "The plugins now loaded", body = serde_json::Value), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "admin only", body = crate::error::ErrorEnvelope), (status = 422, description = "the new plugin set does not load; the old one stays", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn admin_reload(
    State(state): State<AppState>,
    Auth(user): Auth,
) -> Result<Json<Value>, ApiError> {
    if !user.admin {
        return Err(ApiError::new(ErrorCode::Forbidden, "admin only"));
    }
    let host = state.plugins.clone();
    tokio::task::spawn_blocking(move || host.reload())
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::new(ErrorCode::ValidationError, format!("reload failed: {e}")))?;
    Ok(Json(
        json!({ "reloaded": true, "plugins": state.plugins.names() }),
    ))
}
