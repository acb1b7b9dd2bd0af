//! Character Management API handlers: parse, authorize, call `CharacterService`, serialize.

use super::extract::{self, Auth, JsonBody, MaybeAuth};
use super::AppState;
use crate::characters::{AvatarInput, CharacterPatch, NewCharacter};
use crate::characters::{Permissions, Statistics};
use crate::error::{ApiError, ErrorCode};
use crate::model::{Character, PersonalityProfile};
use crate::store::{CharacterQuery, CharacterSort, Scope};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use utoipa::ToSchema;

/// CreateCharacterRequest; top-level scenario/firstMes/mesExample are accepted as well as their
/// copies inside `personality`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = CreateCharacterRequest)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    personality: Option<PersonalityProfile>,
    #[serde(default)]
    scenario: Option<String>,
    #[serde(default)]
    first_mes: Option<String>,
    #[serde(default)]
    mes_example: Option<String>,
    #[serde(default)]
    avatar: Option<String>,
    #[serde(default)]
    voice: Option<Value>,
    #[serde(default)]
    is_public: Option<bool>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    group_id: Option<String>,
}

/// UpdateCharacterRequest: Partial<CreateCharacterRequest> plus `version`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = UpdateCharacterRequest)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    version: Option<u64>,
    name: Option<String>,
    description: Option<String>,
    personality: Option<Map<String, Value>>,
    scenario: Option<String>,
    first_mes: Option<String>,
    mes_example: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    avatar: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    voice: Option<Option<Value>>,
    is_public: Option<bool>,
    is_active: Option<bool>,
    tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    group_id: Option<Option<String>>,
    slug: Option<String>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl CreateRequest {
    fn into_new(self, avatar_file: Option<Vec<u8>>) -> NewCharacter {
        let avatar = match avatar_file {
            Some(bytes) => Some(AvatarInput::Image(bytes)),
            None => self.avatar.map(AvatarInput::Url),
        };
        NewCharacter {
            name: self.name,
            description: self.description,
            personality: self.personality.unwrap_or_default(),
            scenario: self.scenario,
            first_mes: self.first_mes,
            mes_example: self.mes_example,
            avatar,
            voice: self.voice,
            is_public: self.is_public.unwrap_or(false),
            tags: self.tags.unwrap_or_default(),
            group_id: self.group_id,
        }
    }
}

fn to_object(c: &Character) -> Result<Map<String, Value>, ApiError> {
    match serde_json::to_value(c).map_err(ApiError::internal)? {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::internal(
            "character did not serialize to an object",
        )),
    }
}

/// `POST /api/characters` (JSON, or multipart with `character` and `avatar` parts).
#[utoipa::path(
    post,    operation_id = "createCharacter",

    path = "/api/characters",
    tag = "characters",
    request_body(content((CreateRequest = "application/json"), (CreateRequest = "multipart/form-data")), description = "JSON, or multipart with a `character` JSON part and an `avatar` image part"),
    responses((status = 201, description = "Created; adds `created: true` and `uploadUrls.avatar`", body = crate::model::Character), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "character quota reached", body = crate::error::ErrorEnvelope), (status = 413, description = "body or avatar too large", body = crate::error::ErrorEnvelope), (status = 415, description = "not JSON or multipart", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Auth(user): Auth,
    req: Request,
) -> Result<Response, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let new = if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::validation("body", format!("bad multipart body: {e}")))?;
        let mut character: Option<CreateRequest> = None;
        let mut avatar: Option<Vec<u8>> = None;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(extract::multipart_error)?
        {
            match field.name().unwrap_or("") {
                "character" => {
                    let bytes = field.bytes().await.map_err(extract::multipart_error)?;
                    character = Some(extract::parse_json(&bytes)?);
                }
                "avatar" => {
                    avatar = Some(
                        field
                            .bytes()
                            .await
                            .map_err(extract::multipart_error)?
                            .to_vec(),
                    )
                }
                other => {
                    return Err(ApiError::validation(
                        other,
                        "unknown multipart part; expected `character` and `avatar`",
                    ))
                }
            }
        }
        character
            .ok_or_else(|| {
                ApiError::validation("character", "multipart body needs a `character` JSON part")
            })?
            .into_new(avatar)
    } else if extract::is_json(req.headers()) {
        let JsonBody(body) = JsonBody::<CreateRequest>::from_request(req, &state).await?;
        body.into_new(None)
    } else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "expected content-type: application/json or multipart/form-data",
        ));
    };
    let created = state.characters.create(&user, new).await?;
    let mut body = to_object(&created)?;
    body.insert("created".into(), Value::Bool(true));
    body.insert(
        "uploadUrls".into(),
        json!({ "avatar": format!("/api/characters/{}/avatar", created.id) }),
    );
    Ok((StatusCode::CREATED, Json(Value::Object(body))).into_response())
}

/// `GET /api/characters`.
#[utoipa::path(
    get,    operation_id = "listCharacters",

    path = "/api/characters",
    tag = "characters",
    params(("limit" = Option<u32>, Query, description = "page size, 1–200 (default 50)"), ("offset" = Option<u32>, Query, description = "items to skip"), ("search" = Option<String>, Query, description = "words in name, description or tags"), ("tags" = Option<String>, Query, description = "comma-separated; all must match"), ("sort" = Option<String>, Query, description = "name, created, modified (default) or usage"), ("order" = Option<String>, Query, description = "asc or desc (default)"), ("scope" = Option<String>, Query, description = "own (default), public or all")),
    responses((status = 200, description = "A page of characters", body = CharacterPage), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(user): Auth,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    const KNOWN: [&str; 7] = [
        "limit", "offset", "search", "tags", "sort", "order", "scope",
    ];
    if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::validation(
            unknown,
            format!("unknown query parameter; known: {}", KNOWN.join(", ")),
        ));
    }
    let limit = match params.get("limit") {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| ApiError::validation("limit", "must be an integer from 1 to 200"))?,
        None => 50,
    };
    let offset = match params.get("offset") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ApiError::validation("offset", "must be an integer ≥ 0"))?,
        None => 0,
    };
    let sort = match params.get("sort").map(String::as_str) {
        None | Some("modified") => CharacterSort::Modified,
        Some("name") => CharacterSort::Name,
        Some("created") => CharacterSort::Created,
        Some("usage") => CharacterSort::Usage,
        Some(_) => {
            return Err(ApiError::validation(
                "sort",
                "must be one of name, created, modified, usage",
            ))
        }
    };
    let descending = match params.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(ApiError::validation("order", "must be asc or desc")),
    };
    let scope = match params.get("scope").map(String::as_str) {
        None | Some("own") => Scope::Own,
        Some("public") => Scope::Public,
        Some("all") => Scope::All,
        Some(_) => return Err(ApiError::validation("scope", "must be own, public or all")),
    };
    let search = params
        .get("search")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if search.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(ApiError::validation("search", "must be at most 256 bytes"));
    }
    let tags: Vec<String> = params
        .get("tags")
        .map(|t| {
            t.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let query = CharacterQuery {
        owner: user.id.clone(),
        scope,
        search: search.as_ref().map(|s| s.to_lowercase()),
        tags: tags.iter().map(|t| t.to_lowercase()).collect(),
        sort,
        descending,
        limit,
        offset,
    };
    let (page, total) = state.characters.list(query).await?;
    Ok(Json(CharacterPage {
        has_more: (offset + page.len()) < total as usize,
        characters: page.iter().map(|c| c.as_ref()).collect(),
        total,
        filters: ListFilters {
            limit,
            offset,
            search,
            tags,
            sort: params.get("sort").map(String::as_str).unwrap_or("modified"),
            order: if descending { "desc" } else { "asc" },
            scope: params.get("scope").map(String::as_str).unwrap_or("own"),
        },
    })
    .into_response())
}

/// The list response: one page and the filters that produced it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CharacterPage<'a> {
    characters: Vec<&'a Character>,
    total: u64,
    has_more: bool,
    filters: ListFilters<'a>,
}

/// The list query as understood, defaults filled in.
#[derive(Serialize, ToSchema)]
pub struct ListFilters<'a> {
    limit: usize,
    offset: usize,
    search: Option<String>,
    tags: Vec<String>,
    sort: &'a str,
    order: &'a str,
    scope: &'a str,
}

/// The detail response: the character plus what the caller may do and what is related.
#[derive(Serialize, ToSchema)]
#[schema(as = CharacterDetail)]
#[serde(rename_all = "camelCase")]
pub struct CharacterDetailBody<'a> {
    #[serde(flatten)]
    character: &'a Character,
    statistics: &'a Statistics,
    permissions: Permissions,
    related_characters: Vec<&'a Character>,
}

/// `GET /api/characters/{id}`: public characters need no token.
#[utoipa::path(
    get,    operation_id = "getCharacter",

    path = "/api/characters/{id}",
    tag = "characters",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    responses((status = 200, description = "The character with statistics, permissions and related characters", body = CharacterDetailBody), (status = 403, description = "another user's private character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    MaybeAuth(user): MaybeAuth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let detail = state.characters.detail(&id, user.as_ref()).await?;
    Ok(Json(CharacterDetailBody {
        character: &detail.character,
        statistics: &detail.statistics,
        permissions: detail.permissions,
        related_characters: detail.related.iter().map(|c| c.as_ref()).collect(),
    })
    .into_response())
}

/// `PUT /api/characters/{id}`: partial update with optimistic locking.
#[utoipa::path(
    put,    operation_id = "updateCharacter",

    path = "/api/characters/{id}",
    tag = "characters",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    request_body = UpdateRequest,
    responses((status = 200, description = "The updated character", body = crate::model::Character), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope), (status = 409, description = "stale version; details.currentVersion", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateRequest>,
) -> Result<Json<Character>, ApiError> {
    let version = body
        .version
        .ok_or_else(|| ApiError::validation("version", "is required for optimistic locking"))?;
    let patch = CharacterPatch {
        version,
        name: body.name,
        description: body.description,
        personality: body.personality,
        scenario: body.scenario,
        first_mes: body.first_mes,
        mes_example: body.mes_example,
        avatar: body.avatar.map(|a| a.map(AvatarInput::Url)),
        voice: body.voice,
        is_public: body.is_public,
        is_active: body.is_active,
        tags: body.tags,
        group_id: body.group_id,
        slug: body.slug,
    };
    Ok(Json(state.characters.update(&id, &user, patch).await?))
}

/// `DELETE /api/characters/{id}`.
#[utoipa::path(
    delete,    operation_id = "deleteCharacter",

    path = "/api/characters/{id}",
    tag = "characters",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    responses((status = 204, description = "Deleted with its conversations, memory and avatar"), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.characters.delete(&id, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /api/characters/{id}/avatar`: a raw image body or a multipart `avatar` part.
#[utoipa::path(
    put,    operation_id = "putAvatar",

    path = "/api/characters/{id}/avatar",
    tag = "characters",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    request_body(content((Vec<u8> = "image/*"), (Vec<u8> = "multipart/form-data")), description = "A raw image body or a multipart `avatar` part"),
    responses((status = 200, description = "The character with its new avatar URL", body = crate::model::Character), (status = 400, description = "invalid parameter or body; details.field names it", body = crate::error::ErrorEnvelope), (status = 401, description = "missing, malformed or expired token", body = crate::error::ErrorEnvelope), (status = 403, description = "the caller may not change this character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope), (status = 413, description = "image too large", body = crate::error::ErrorEnvelope)),
    security(("bearer" = []))
)]
pub async fn put_avatar(
    State(state): State<AppState>,
    Auth(user): Auth,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Character>, ApiError> {
    let bytes = extract::uploads(req, &state, &["avatar", "file"])
        .await?
        .into_iter()
        .next()
        .map(|(_, b)| b)
        .unwrap_or_default();
    if bytes.is_empty() {
        return Err(ApiError::validation("avatar", "image body is empty"));
    }
    Ok(Json(state.characters.put_avatar(&id, &user, bytes).await?))
}

/// `GET /api/characters/{id}/avatar`: the image with its content type, ETag and caching.
#[utoipa::path(
    get,    operation_id = "getAvatar",

    path = "/api/characters/{id}/avatar",
    tag = "characters",
    params(("id" = String, Path, description = "Character id (UUID v7)")),
    responses((status = 200, description = "The image, with ETag and Cache-Control", content_type = "image/*"), (status = 304, description = "Not modified (If-None-Match)"), (status = 403, description = "another user's private character", body = crate::error::ErrorEnvelope), (status = 404, description = "no such character (or not visible to the caller)", body = crate::error::ErrorEnvelope)),
    security((), ("bearer" = []))
)]
pub async fn get_avatar(
    State(state): State<AppState>,
    MaybeAuth(user): MaybeAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let avatar = state.characters.get_avatar(&id, user.as_ref()).await?;
    let cache = if state.characters.get(&id, user.as_ref())?.is_public {
        "public, max-age=300"
    } else {
        "private, max-age=300"
    };
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == avatar.etag));
    let builder = Response::builder()
        .header(header::ETAG, &avatar.etag)
        .header(header::CACHE_CONTROL, cache);
    let response = if not_modified {
        builder.status(StatusCode::NOT_MODIFIED).body(Body::empty())
    } else {
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, &avatar.content_type)
            .body(Body::from(avatar.bytes))
    };
    response.map_err(ApiError::internal)
}
