//! Moving one user's data in and out as plain files (`taproom export-all`, `taproom import`):
//! their characters (JSON plus the avatar image) and every chat of theirs as SillyTavern JSONL,
//! listed in a `manifest.json`.
//!
//! Card files go through exactly two functions, `card_files` (export) and `read_card` (import),
//! so PNG/CharX cards plug in there once the cards module lands.
//!
//! Layout of an export directory:
//! ```text
//! manifest.json                  format, version, user, the list below
//! characters/<id>.json           the Character as the API returns it
//! characters/<id>.avatar.<ext>   its stored avatar, if any
//! chats/<conversation id>.jsonl  SillyTavern chat JSONL
//! ```

use crate::auth::User;
use crate::conversations::ConversationService;
use crate::error::ApiError;
use crate::model::Character;
use crate::store::{
    parse_id, CharacterQuery, CharacterSort, Scope, Store, StoreError, StoredAvatar,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `format` value of a manifest.
pub const FORMAT: &str = "taproom-export";

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("{0}")]
    Format(String),
}

/// The index of an export directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always `taproom-export`.
    pub format: String,
    /// Layout version, 1.
    pub version: u32,
    /// The user (`sub`) whose data this is.
    pub user: String,
    /// RFC 3339 time of the export.
    pub exported_at: String,
    /// One entry per character.
    pub characters: Vec<CharacterEntry>,
    /// One entry per chat.
    pub chats: Vec<ChatEntry>,
}

/// A character's files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CharacterEntry {
    /// Character id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Card file, relative to the export directory.
    pub file: String,
    /// Avatar image file, relative to the export directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Avatar content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_type: Option<String>,
}

/// A chat file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatEntry {
    /// JSONL file, relative to the export directory.
    pub file: String,
    /// Character the chat is with.
    pub character_id: String,
    /// Conversation id at export time.
    pub conversation_id: String,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Characters created.
    pub characters: usize,
    /// Characters already present (same id), left unchanged.
    pub skipped: usize,
    /// Chats imported as new conversations.
    pub chats: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(dir: &Path, rel: &str, bytes: &[u8]) -> Result<(), TransferError> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(&path, bytes).map_err(io(&path))
}

fn extension(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        _ => "bin",
    }
}

/// A character's manifest entry and its files as (relative path, bytes).
pub type CardFiles = (CharacterEntry, Vec<(String, Vec<u8>)>);

/// The files that represent one character. Today: its JSON and its avatar; the PNG card
/// (avatar with the card embedded) replaces both once the cards module exists.
pub fn card_files(
    c: &Character,
    avatar: Option<&StoredAvatar>,
) -> Result<CardFiles, TransferError> {
    let json = serde_json::to_vec_pretty(c).map_err(|e| TransferError::Format(e.to_string()))?;
    let file = format!("characters/{}.json", c.id);
    let mut files = vec![(file.clone(), json)];
    let mut entry = CharacterEntry {
        id: c.id.clone(),
        name: c.name.clone(),
        file,
        avatar: None,
        avatar_type: None,
    };
    if let Some(a) = avatar {
        let name = format!("characters/{}.avatar.{}", c.id, extension(&a.content_type));
        files.push((name.clone(), a.bytes.clone()));
        entry.avatar = Some(name);
        entry.avatar_type = Some(a.content_type.clone());
    }
    Ok((entry, files))
}

/// Reads one character back from its files (the inverse of `card_files`).
pub fn read_card(
    dir: &Path,
    entry: &CharacterEntry,
) -> Result<(Character, Option<StoredAvatar>), TransferError> {
    let path = dir.join(&entry.file);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let c: Character = serde_json::from_slice(&bytes)
        .map_err(|e| TransferError::Format(format!("{}: {e}", path.display())))?;
    let avatar = match (&entry.avatar, &entry.avatar_type) {
        (Some(file), Some(ct)) => {
            let path = dir.join(file);
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            Some(StoredAvatar {
                content_type: ct.clone(),
                etag: format!("\"{}-{}\"", c.id, c.version),
                bytes,
            })
        }
        _ => None,
    };
    Ok((c, avatar))
}

/// Writes everything `user` owns and every chat of theirs into `dir`.
pub fn export_user(
    store: &Store,
    conversations: &ConversationService,
    user: &str,
    dir: &Path,
) -> Result<Manifest, TransferError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let caller = User {
        id: user.to_owned(),
        admin: false,
        name: None,
    };
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: 1,
        user: user.to_owned(),
        exported_at: crate::time::now_rfc3339(),
        characters: Vec::new(),
        chats: Vec::new(),
    };
    let mut offset = 0;
    loop {
        let (page, _) = store.list_characters(&CharacterQuery {
            owner: user.to_owned(),
            scope: Scope::Own,
            search: None,
            tags: Vec::new(),
            sort: CharacterSort::Created,
            descending: false,
            limit: 200,
            offset,
        })?;
        if page.is_empty() {
            break;
        }
        offset += page.len();
        for c in page {
            let avatar = match parse_id(&c.id) {
                Some(id) => store.get_avatar(id)?,
                None => None,
            };
            let (entry, files) = card_files(&c, avatar.as_ref())?;
            for (name, bytes) in files {
                write(dir, &name, &bytes)?;
            }
            manifest.characters.push(entry);
        }
    }
    for cid in store.user_conversation_ids(user)? {
        let cid = uuid::Uuid::from_u128(cid).to_string();
        let history = conversations.load_owned(&cid, &caller)?;
        let (_, jsonl) = conversations.export_jsonl(&caller, &cid)?;
        let file = format!("chats/{cid}.jsonl");
        write(dir, &file, jsonl.as_bytes())?;
        manifest.chats.push(ChatEntry {
            file,
            character_id: history.conversation.character_id.clone(),
            conversation_id: cid,
        });
    }
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| TransferError::Format(e.to_string()))?;
    write(dir, "manifest.json", &json)?;
    Ok(manifest)
}

/// Reads `dir/manifest.json` and imports its characters (kept under their ids; ones already
/// present are skipped) and chats (as new conversations) for the manifest's user.
pub async fn import_dir(
    store: &Store,
    conversations: &ConversationService,
    dir: &Path,
) -> Result<ImportReport, TransferError> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| TransferError::Format(format!("{}: {e}", path.display())))?;
    if manifest.format != FORMAT || manifest.version != 1 {
        return Err(TransferError::Format(format!(
            "{}: not a taproom export (format {:?}, version {})",
            path.display(),
            manifest.format,
            manifest.version
        )));
    }
    let user = User {
        id: manifest.user.clone(),
        admin: false,
        name: None,
    };
    let mut report = ImportReport::default();
    for entry in &manifest.characters {
        let (mut c, avatar) = read_card(dir, entry)?;
        let id = parse_id(&c.id)
            .ok_or_else(|| TransferError::Format(format!("{}: bad character id", entry.file)))?;
        if store.get_character(id)?.is_some() {
            report.skipped += 1;
            continue;
        }
        c.creator_id = manifest.user.clone();
        // An import restores what the user already had, so the quota does not apply.
        store.create_character(&mut c, avatar.as_ref(), u64::MAX)?;
        report.characters += 1;
    }
    for chat in &manifest.chats {
        let path = dir.join(&chat.file);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        conversations
            .import_jsonl(&user, &chat.character_id, &bytes)
            .await?;
        report.chats += 1;
    }
    Ok(report)
}
