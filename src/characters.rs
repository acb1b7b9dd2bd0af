//! The character domain service: validation, access rules, versioning and the detail extras
//! (statistics, permissions, related characters). Knows nothing of HTTP; storage goes through
//! `Store`, run on the blocking pool because redb commits fsync.

use crate::auth::User;
use crate::config::LimitsConfig;
use crate::error::{ApiError, ErrorCode};
use crate::model::{Character, PersonalityProfile};
use crate::store::{
    self, AvatarChange, CharacterQuery, RelatedCandidate, Store, StoreError, StoredAvatar,
};
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Longest name, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest description in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 32 * 1024;
/// Most tags on one character.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// An avatar as a client supplies it.
#[derive(Debug, Clone)]
pub enum AvatarInput {
    /// An external http(s) URL, stored as is.
    Url(String),
    /// Image bytes (from a data URL or an upload).
    Image(Vec<u8>),
}

/// Fields of a new character.
#[derive(Debug, Clone, Default)]
pub struct NewCharacter {
    pub name: String,
    pub description: String,
    pub personality: PersonalityProfile,
    pub scenario: Option<String>,
    pub first_mes: Option<String>,
    pub mes_example: Option<String>,
    pub avatar: Option<AvatarInput>,
    pub voice: Option<Value>,
    pub is_public: bool,
    pub tags: Vec<String>,
    pub group_id: Option<String>,
}

/// A partial update; `None` leaves a field as it is, `Some(None)` clears an optional one.
#[derive(Debug, Clone, Default)]
pub struct CharacterPatch {
    pub version: u64,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Keys merged over the stored profile (a shallow JSON merge).
    pub personality: Option<Map<String, Value>>,
    pub scenario: Option<String>,
    pub first_mes: Option<String>,
    pub mes_example: Option<String>,
    pub avatar: Option<Option<AvatarInput>>,
    pub voice: Option<Option<Value>>,
    pub is_public: Option<bool>,
    pub is_active: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub group_id: Option<Option<String>>,
    /// A new slug (the model id is `char-<slug>`).
    pub slug: Option<String>,
}

/// What the caller may do with a character.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Permissions {
    pub can_view: bool,
    pub can_edit: bool,
    pub can_delete: bool,
    pub can_interact: bool,
}

/// Usage figures for one character.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub conversation_count: u64,
    pub message_count: u64,
    pub memory_count: u64,
    pub usage_count: u64,
    pub last_used_at: Option<String>,
}

/// The detail view's extras.
#[derive(Debug, Clone)]
pub struct CharacterDetail {
    pub character: Arc<Character>,
    pub statistics: Statistics,
    pub permissions: Permissions,
    pub related: Vec<Arc<Character>>,
}

/// The character service.
#[derive(Clone)]
pub struct CharacterService {
    store: Store,
    limits: LimitsConfig,
    /// Related-character candidates per (character, version), kept for a minute: other
    /// characters change without bumping this one's version, so the list may lag that long.
    related: moka::sync::Cache<(u128, u64), Arc<Vec<RelatedCandidate>>>,
    /// Concurrent list scans, at most one per core: more only time-slice each other, and the
    /// fair queue keeps the slowest answers close to the median.
    scans: Arc<tokio::sync::Semaphore>,
}

impl CharacterService {
    /// A service over `store` with the configured limits.
    pub fn new(store: Store, limits: LimitsConfig, cache_capacity: u64) -> Self {
        Self {
            store,
            limits,
            // As many as the character cache: a cached read should not have to recompute them.
            related: moka::sync::Cache::builder()
                .max_capacity(cache_capacity)
                .time_to_live(Duration::from_secs(60))
                .build(),
            scans: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates a character owned by `user`.
    pub async fn create(&self, user: &User, new: NewCharacter) -> Result<Character, ApiError> {
        let name = validate_name(&new.name)?;
        validate_description(&new.description)?;
        let tags = normalize_tags(new.tags)?;
        let id = Uuid::now_v7();
        let now = crate::time::now_rfc3339();
        let (avatar_url, stored_avatar) = match new.avatar {
            Some(input) => self.prepare_avatar(id, input)?,
            None => (None, None),
        };
        let personality = new.personality;
        let character = Character {
            id: id.to_string(),
            scenario: new.scenario.unwrap_or_else(|| personality.scenario.clone()),
            first_mes: new
                .first_mes
                .unwrap_or_else(|| personality.first_mes.clone()),
            mes_example: new
                .mes_example
                .unwrap_or_else(|| personality.mes_example.clone()),
            name,
            description: new.description,
            created_at: now.clone(),
            updated_at: now,
            personality,
            avatar: avatar_url,
            voice: new.voice,
            tags,
            is_public: new.is_public,
            is_active: true,
            usage_count: 0,
            creator_id: user.id.clone(),
            group_id: non_empty(new.group_id),
            version: 1,
            slug: Some(slugify(&new.name)),
        };
        let character = mirror_profile(character);
        let store = self.store.clone();
        let quota = self.limits.max_characters_per_user;
        let mut to_store = character;
        Ok(blocking(move || {
            store
                .create_character(&mut to_store, stored_avatar.as_ref(), quota)
                .map(|_| to_store)
        })
        .await?)
    }

    /// Creates a character from an imported card (its image, if any, becomes the avatar).
    pub async fn create_from_card(
        &self,
        user: &User,
        card: crate::cards::ImportedCard,
    ) -> Result<Character, ApiError> {
        let id = Uuid::now_v7();
        let (avatar_url, stored_avatar) = match card.avatar {
            Some(a) => match self.prepare_avatar(id, AvatarInput::Image(a.bytes)) {
                Ok(prepared) => prepared,
                // A card whose picture cannot be used still imports, without an avatar.
                Err(e) if e.code == ErrorCode::ValidationError => (None, None),
                Err(e) => return Err(e),
            },
            None => (None, None),
        };
        let mut character = card
            .character
            .into_character(crate::cards::NewCharacterMeta {
                id: id.to_string(),
                creator_id: user.id.clone(),
                now: crate::time::now_rfc3339(),
                avatar_url,
                is_public: false,
            });
        character.name = validate_name(&character.name)
            .map_err(|e| ApiError::new(ErrorCode::CharacterInvalidData, e.message))?;
        validate_description(&character.description)
            .map_err(|e| ApiError::new(ErrorCode::CharacterInvalidData, e.message))?;
        if character.tags.len() > MAX_TAGS
            || character
                .tags
                .iter()
                .any(|t| t.chars().count() > MAX_TAG_CHARS)
        {
            return Err(ApiError::new(
                ErrorCode::CharacterInvalidData,
                format!("tags: at most {MAX_TAGS} tags of at most {MAX_TAG_CHARS} characters"),
            ));
        }
        let store = self.store.clone();
        let quota = self.limits.max_characters_per_user;
        Ok(blocking(move || {
            store
                .create_character(&mut character, stored_avatar.as_ref(), quota)
                .map(|_| character)
        })
        .await?)
    }

    /// A character the caller may view (anyone, even anonymous, for public characters).
    pub fn get(&self, id: &str, user: Option<&User>) -> Result<Arc<Character>, ApiError> {
        let c = self.load(id)?;
        if !can_view(&c, user) {
            return Err(ApiError::character_access_denied(format!(
                "character {id} is private to its owner"
            )));
        }
        Ok(c)
    }

    /// A character the caller may edit (owner or admin).
    pub fn get_editable(&self, id: &str, user: &User) -> Result<Arc<Character>, ApiError> {
        let c = self.load(id)?;
        if !can_edit(&c, user) {
            return Err(ApiError::character_access_denied(format!(
                "only the owner of character {id} or an admin may change it"
            )));
        }
        Ok(c)
    }

    fn load(&self, id: &str) -> Result<Arc<Character>, ApiError> {
        let key = store::parse_id(id).ok_or_else(|| ApiError::character_not_found(id))?;
        self.store
            .get_character(key)?
            .ok_or_else(|| ApiError::character_not_found(id))
    }

    /// The detail view: the character plus statistics, permissions and related characters.
    pub async fn detail(&self, id: &str, user: Option<&User>) -> Result<CharacterDetail, ApiError> {
        let character = self.get(id, user)?;
        let permissions = permissions(&character, user);
        let stats = match store::parse_id(&character.id) {
            Some(key) => self.store.character_stats(key)?,
            None => Default::default(),
        };
        let statistics = Statistics {
            conversation_count: stats.conversation_count,
            message_count: stats.message_count,
            memory_count: stats.memory_count,
            usage_count: character.usage_count,
            last_used_at: stats.last_used_ms.map(crate::time::ms_to_rfc3339),
        };
        let related = self.related(&character, user).await?;
        Ok(CharacterDetail {
            character,
            statistics,
            permissions,
            related,
        })
    }

    async fn related(
        &self,
        c: &Arc<Character>,
        user: Option<&User>,
    ) -> Result<Vec<Arc<Character>>, ApiError> {
        let Some(key) = store::parse_id(&c.id) else {
            return Ok(Vec::new());
        };
        let candidates = match self.related.get(&(key, c.version)) {
            Some(found) => found,
            None => {
                let store = self.store.clone();
                let me = c.clone();
                // A few spares so that filtering for the viewer still leaves five.
                let found = Arc::new(blocking(move || store.related_candidates(&me, 20)).await?);
                self.related.insert((key, c.version), found.clone());
                found
            }
        };
        let mut out = Vec::with_capacity(5);
        for cand in candidates.iter() {
            if out.len() == 5 {
                break;
            }
            let visible = cand.public || user.is_some_and(|u| u.admin || u.id == cand.owner);
            if !visible {
                continue;
            }
            if let Some(r) = self.store.get_character(cand.id)? {
                if can_view(&r, user) && r.is_active {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// One page of characters.
    pub async fn list(&self, q: CharacterQuery) -> Result<(Vec<Arc<Character>>, u64), ApiError> {
        let _permit = self
            .scans
            .acquire()
            .await
            .map_err(|_| ApiError::internal("list queue closed"))?;
        let store = self.store.clone();
        Ok(blocking(move || store.list_characters(&q)).await?)
    }

    /// Applies a partial update if `patch.version` is current.
    pub async fn update(
        &self,
        id: &str,
        user: &User,
        patch: CharacterPatch,
    ) -> Result<Character, ApiError> {
        let current = self.get_editable(id, user)?;
        if current.version != patch.version {
            return Err(StoreError::VersionConflict {
                current: current.version,
            }
            .into());
        }
        let mut next = (*current).clone();
        if let Some(name) = patch.name {
            next.name = validate_name(&name)?;
        }
        if let Some(description) = patch.description {
            validate_description(&description)?;
            next.description = description;
        }
        if let Some(fields) = patch.personality {
            next.personality = merge_profile(&next.personality, fields)?;
            // Profile copies of the top-level fields win when the client sent them.
            next.scenario = next.personality.scenario.clone();
            next.first_mes = next.personality.first_mes.clone();
            next.mes_example = next.personality.mes_example.clone();
            if !next.personality.name.trim().is_empty()
                && next.personality.name != current.personality.name
            {
                next.name = validate_name(&next.personality.name)?;
            }
        }
        if let Some(v) = patch.scenario {
            next.scenario = v;
        }
        if let Some(v) = patch.first_mes {
            next.first_mes = v;
        }
        if let Some(v) = patch.mes_example {
            next.mes_example = v;
        }
        if let Some(tags) = patch.tags {
            next.tags = normalize_tags(tags)?;
        }
        if let Some(v) = patch.is_public {
            next.is_public = v;
        }
        if let Some(v) = patch.is_active {
            next.is_active = v;
        }
        if let Some(v) = patch.voice {
            next.voice = v;
        }
        if let Some(v) = patch.group_id {
            next.group_id = non_empty(v);
        }
        if let Some(slug) = patch.slug {
            let clean = slugify(&slug);
            if clean != slug.trim().to_lowercase() {
                return Err(ApiError::validation(
                    "slug",
                    format!("use lowercase letters, digits and dashes, e.g. {clean}"),
                ));
            }
            next.slug = Some(clean);
        }
        let key = store::parse_id(id).ok_or_else(|| ApiError::character_not_found(id))?;
        let avatar_change = match patch.avatar {
            None => AvatarChange::Keep,
            Some(None) => {
                next.avatar = None;
                AvatarChange::Remove
            }
            Some(Some(input)) => {
                let (url, stored) = self.prepare_avatar(Uuid::from_u128(key), input)?;
                next.avatar = url;
                match stored {
                    Some(a) => AvatarChange::Set(a),
                    None => AvatarChange::Remove,
                }
            }
        };
        next.version = current.version + 1;
        next.updated_at = crate::time::now_rfc3339();
        let next = mirror_profile(next);
        let store = self.store.clone();
        let to_store = next.clone();
        let expected = current.version;
        Ok(blocking(move || store.update_character(&to_store, expected, avatar_change)).await?)
    }

    /// Deletes a character and everything hanging off it.
    pub async fn delete(&self, id: &str, user: &User) -> Result<(), ApiError> {
        self.get_editable(id, user)?;
        let key = store::parse_id(id).ok_or_else(|| ApiError::character_not_found(id))?;
        let store = self.store.clone();
        blocking(move || store.delete_character(key)).await?;
        Ok(())
    }

    /// Replaces the avatar image (owner or admin); bumps the version.
    pub async fn put_avatar(
        &self,
        id: &str,
        user: &User,
        bytes: Vec<u8>,
    ) -> Result<Character, ApiError> {
        let current = self.get_editable(id, user)?;
        let patch = CharacterPatch {
            version: current.version,
            avatar: Some(Some(AvatarInput::Image(bytes))),
            ..CharacterPatch::default()
        };
        self.update(id, user, patch).await
    }

    /// The stored avatar image of a character the caller may view.
    pub async fn get_avatar(
        &self,
        id: &str,
        user: Option<&User>,
    ) -> Result<StoredAvatar, ApiError> {
        self.get(id, user)?;
        let key = store::parse_id(id).ok_or_else(|| ApiError::character_not_found(id))?;
        let store = self.store.clone();
        blocking(move || store.get_avatar(key))
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("character {id} has no stored avatar image"))
            })
    }

    /// Turns a client avatar into the stored form: an external URL, or validated image bytes
    /// served from `/api/characters/{id}/avatar`.
    fn prepare_avatar(
        &self,
        id: Uuid,
        input: AvatarInput,
    ) -> Result<(Option<String>, Option<StoredAvatar>), ApiError> {
        match input {
            AvatarInput::Url(url) => {
                let trimmed = url.trim();
                if let Some(rest) = trimmed.strip_prefix("data:") {
                    let bytes = decode_data_url(rest)?;
                    return self.prepare_avatar(id, AvatarInput::Image(bytes));
                }
                if !(trimmed.starts_with("http://") || trimmed.starts_with("https://"))
                    || trimmed.len() > 2048
                {
                    return Err(ApiError::validation(
                        "avatar",
                        "must be a data URL (png, jpeg, webp, gif) or an http(s) URL",
                    ));
                }
                Ok((Some(trimmed.to_string()), None))
            }
            AvatarInput::Image(bytes) => {
                let content_type = validate_image(&bytes, self.limits.max_avatar_bytes)?;
                let avatar = StoredAvatar {
                    content_type: content_type.to_string(),
                    etag: format!("\"{}\"", Uuid::new_v4().simple()),
                    bytes,
                };
                Ok((Some(format!("/api/characters/{id}/avatar")), Some(avatar)))
            }
        }
    }
}

/// Runs a store call on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// Whether `user` may see `c`.
pub fn can_view(c: &Character, user: Option<&User>) -> bool {
    c.is_public || user.is_some_and(|u| u.admin || u.id == c.creator_id)
}

/// Whether `user` may change or delete `c`.
pub fn can_edit(c: &Character, user: &User) -> bool {
    user.admin || user.id == c.creator_id
}

/// The caller's permissions on a character.
pub fn permissions(c: &Character, user: Option<&User>) -> Permissions {
    let view = can_view(c, user);
    let edit = user.is_some_and(|u| can_edit(c, u));
    Permissions {
        can_view: view,
        can_edit: edit,
        can_delete: edit,
        can_interact: view && user.is_some() && c.is_active,
    }
}

/// Keeps the profile's copies of the top-level fields equal to them, so both views agree.
fn mirror_profile(mut c: Character) -> Character {
    c.personality.name = c.name.clone();
    c.personality.description = c.description.clone();
    c.personality.scenario = c.scenario.clone();
    c.personality.first_mes = c.first_mes.clone();
    c.personality.mes_example = c.mes_example.clone();
    c
}

fn merge_profile(
    current: &PersonalityProfile,
    fields: Map<String, Value>,
) -> Result<PersonalityProfile, ApiError> {
    let mut base = serde_json::to_value(current).map_err(ApiError::internal)?;
    if let Some(obj) = base.as_object_mut() {
        for (k, v) in fields {
            obj.insert(k, v);
        }
    }
    serde_json::from_value(base).map_err(|e| ApiError::validation("personality", e.to_string()))
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A lowercase ASCII slug for a name; substrings NextChat treats specially in model ids
/// (`vision`, `vl`, `-thinking`, `deepseek-r`) are broken up with a dash.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    for ch in name.trim().to_lowercase().chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out = out.trim_matches('-').to_string();
    for (bad, good) in [
        ("vision", "visi-on"),
        ("vl", "v-l"),
        ("thinking", "think-ing"),
        ("deepseek-r", "deepseek-x-r"),
    ] {
        out = out.replace(bad, good);
    }
    out.truncate(48);
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "character".into()
    } else {
        out
    }
}

/// Trims and checks a name: 1..=128 characters.
pub fn validate_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::validation("name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::validation(
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    Ok(name.to_string())
}

fn validate_description(d: &str) -> Result<(), ApiError> {
    if d.len() > MAX_DESCRIPTION_BYTES {
        return Err(ApiError::validation(
            "description",
            format!("must be at most {MAX_DESCRIPTION_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Trims tags, drops case-insensitive duplicates and checks counts and lengths.
pub fn normalize_tags(tags: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        let t = tag.trim();
        if t.is_empty() {
            return Err(ApiError::validation("tags", "a tag must not be empty"));
        }
        if t.chars().count() > MAX_TAG_CHARS {
            return Err(ApiError::validation(
                "tags",
                format!("a tag must be at most {MAX_TAG_CHARS} characters"),
            ));
        }
        let lower = t.to_lowercase();
        if !out.iter().any(|o| o.to_lowercase() == lower) {
            out.push(t.to_string());
        }
    }
    if out.len() > MAX_TAGS {
        return Err(ApiError::validation(
            "tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    Ok(out)
}

fn decode_data_url(rest: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::validation("avatar", "data URL has no comma"))?;
    let mime = meta.split(';').next().unwrap_or("");
    if !matches!(
        mime,
        "image/png" | "image/jpeg" | "image/jpg" | "image/webp" | "image/gif"
    ) {
        return Err(ApiError::validation(
            "avatar",
            "data URL must be image/png, image/jpeg, image/webp or image/gif",
        ));
    }
    if !meta.ends_with(";base64") {
        return Err(ApiError::validation("avatar", "data URL must be base64"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|_| ApiError::validation("avatar", "data URL is not valid base64"))
}

/// Checks that `bytes` decode as a png, jpeg, webp or gif image within `max` bytes; returns
/// the content type.
pub fn validate_image(bytes: &[u8], max: usize) -> Result<&'static str, ApiError> {
    if bytes.len() > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("avatar: image is larger than {max} bytes"),
        )
        .with_details(serde_json::json!({"field": "avatar", "limit": max})));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| ApiError::validation("avatar", "not a png, jpeg, webp or gif image"))?;
    let content_type = match format {
        image::ImageFormat::Png => "image/png",
        image::ImageFormat::Jpeg => "image/jpeg",
        image::ImageFormat::WebP => "image/webp",
        image::ImageFormat::Gif => "image/gif",
        _ => {
            return Err(ApiError::validation(
                "avatar",
                "not a png, jpeg, webp or gif image",
            ))
        }
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(8192);
    limits.max_image_height = Some(8192);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| ApiError::validation("avatar", format!("image does not decode: {e}")))?;
    Ok(content_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_trimmed_and_deduplicated() {
        let t = normalize_tags(vec![" Fantasy ".into(), "fantasy".into(), "Elf".into()]).unwrap();
        assert_eq!(t, vec!["Fantasy", "Elf"]);
    }

    #[test]
    fn empty_tag_is_rejected() {
        assert!(normalize_tags(vec!["  ".into()]).is_err());
    }

    #[test]
    fn too_many_tags_is_rejected() {
        let tags = (0..33).map(|i| format!("t{i}")).collect();
        assert!(normalize_tags(tags).is_err());
    }

    #[test]
    fn slugs_are_lowercase_and_avoid_nextchat_triggers() {
        assert_eq!(slugify("Seraphina"), "seraphina");
        assert_eq!(slugify("  Dr. Ada Lovelace! "), "dr-ada-lovelace");
        assert_eq!(slugify("Vlad"), "v-lad");
        assert_eq!(slugify("Vision Quest"), "visi-on-quest");
        assert_eq!(slugify("🌸"), "character");
    }

    #[test]
    fn name_limits() {
        assert!(validate_name("   ").is_err());
        assert_eq!(validate_name("  Ann ").unwrap(), "Ann");
        assert!(validate_name(&"é".repeat(128)).is_ok());
        assert!(validate_name(&"é".repeat(129)).is_err());
    }

    #[test]
    fn not_an_image_is_rejected() {
        assert!(validate_image(b"hello", 100).is_err());
    }
}
