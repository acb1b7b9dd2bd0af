//! Character cards: import and export of SillyTavern / TavernAI character cards and lorebooks.
//!
//! This module owns every card format Taproom reads or writes — PNG cards (`tEXt` chunks `chara`
//! and `ccv3`), JSON cards (V1, V2, V3, SillyTavern's V2-with-V1-mirror, Pygmalion), CharX zips,
//! SillyTavern World Info files and NextChat masks — and the lossless mapping between a card and
//! the domain [`Character`] (the table is in `docs/CARDS.md`).
//!
//! Architecture invariant: this module is pure. It does no IO, knows no HTTP types and reads no
//! clock; bytes and values go in, bytes and values come out. The HTTP layer maps [`CardError`] to
//! 413 ([`CardError::is_too_large`]) or 422.
//!
//! # Layout
//! - [`png`]: chunk walking, card chunk read/write, the built-in avatar.
//! - [`parse`]: card JSON → [`CardCharacter`].
//! - [`export`]: [`Character`] → V2/V3 JSON, PNG card, NextChat mask.
//! - [`charx`]: CharX zip read (with zip-bomb checks) and write.
//! - [`lorebook`]: World Info ⇄ `character_book`, merging.

pub mod charx;
mod error;
pub mod export;
pub mod lorebook;
pub mod parse;
pub mod png;

use serde_json::Value;

pub use charx::export_charx;
pub use error::CardError;
pub use export::{export_nextchat_mask, export_png, to_v2_json, to_v3_json};
pub use lorebook::{lorebook_to_worldinfo, merge_lorebooks, parse_lorebook};

use crate::model::{Character, PersonalityProfile};

/// Longest accepted character name, in characters after trimming.
pub const MAX_NAME_CHARS: usize = 128;

/// Size limits applied while importing; [`CardLimits::default`] fits normal cards with room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardLimits {
    /// Largest accepted upload, in bytes (default 20 MiB).
    pub max_input_bytes: u64,
    /// Largest total uncompressed size of a CharX archive, declared or actual (default 50 MiB).
    pub max_uncompressed_bytes: u64,
    /// Highest accepted uncompressed:compressed ratio of a zip entry (default 100).
    pub max_compression_ratio: u64,
    /// Entries smaller than this are not ratio-checked: they cannot exhaust memory (default 64 KiB).
    pub ratio_check_min_bytes: u64,
}

impl Default for CardLimits {
    fn default() -> Self {
        Self {
            max_input_bytes: 20 * 1024 * 1024,
            max_uncompressed_bytes: 50 * 1024 * 1024,
            max_compression_ratio: 100,
            ratio_check_min_bytes: 64 * 1024,
        }
    }
}

/// The container an imported card came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardFormat {
    /// A PNG with `chara` / `ccv3` text chunks.
    Png,
    /// A bare JSON card.
    Json,
    /// A CharX zip archive.
    Charx,
}

/// The card JSON shape that was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardSpec {
    /// TavernAI flat JSON.
    V1,
    /// `chara_card_v2`.
    V2,
    /// `chara_card_v3`.
    V3,
    /// Pygmalion (`char_name`, `char_persona`, …).
    Pygmalion,
}

impl CardSpec {
    /// A short lowercase name (`v1`, `v2`, `v3`, `pygmalion`).
    pub fn as_str(self) -> &'static str {
        match self {
            CardSpec::V1 => "v1",
            CardSpec::V2 => "v2",
            CardSpec::V3 => "v3",
            CardSpec::Pygmalion => "pygmalion",
        }
    }
}

/// An avatar image extracted from a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Avatar {
    /// The image bytes (for PNG cards: the PNG without its card chunks).
    pub bytes: Vec<u8>,
    /// MIME type sniffed from the bytes, e.g. `image/png`.
    pub content_type: &'static str,
    /// File extension without the dot, e.g. `png`.
    pub ext: String,
}

/// The card-derived pieces of a [`Character`]; the caller adds id, owner, timestamps and version.
#[derive(Debug, Clone, PartialEq)]
pub struct CardCharacter {
    /// Card `name` (verbatim; validated non-empty and ≤ 128 chars after trimming).
    pub name: String,
    /// Card `description`.
    pub description: String,
    /// Card `scenario`.
    pub scenario: String,
    /// Card `first_mes`.
    pub first_mes: String,
    /// Card `mes_example`.
    pub mes_example: String,
    /// Card `tags` (a comma-separated string is split).
    pub tags: Vec<String>,
    /// Everything else, including fields with no `Character` column (see `docs/CARDS.md`).
    pub personality: PersonalityProfile,
}

/// What the caller supplies to turn a [`CardCharacter`] into a stored [`Character`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCharacterMeta {
    /// UUID v7.
    pub id: String,
    /// Owner's user id.
    pub creator_id: String,
    /// RFC 3339 UTC creation time (also used as `updated_at`).
    pub now: String,
    /// URL of the stored avatar, if one was stored.
    pub avatar_url: Option<String>,
    /// Whether other users may see the character.
    pub is_public: bool,
}

impl CardCharacter {
    /// A new [`Character`] from these pieces: active, version 1, usage 0.
    pub fn into_character(self, meta: NewCharacterMeta) -> Character {
        let meta_name_for_slug = self.name.clone();
        Character {
            id: meta.id,
            name: self.name,
            description: self.description,
            created_at: meta.now.clone(),
            updated_at: meta.now,
            personality: self.personality,
            scenario: self.scenario,
            first_mes: self.first_mes,
            mes_example: self.mes_example,
            avatar: meta.avatar_url,
            voice: None,
            tags: self.tags,
            is_public: meta.is_public,
            is_active: true,
            usage_count: 0,
            creator_id: meta.creator_id,
            group_id: None,
            version: 1,
            slug: Some(crate::characters::slugify(&meta_name_for_slug)),
        }
    }

    /// The card-relevant pieces of a stored character (what an export writes).
    pub fn from_character(c: &Character) -> Self {
        Self {
            name: c.name.clone(),
            description: c.description.clone(),
            scenario: c.scenario.clone(),
            first_mes: c.first_mes.clone(),
            mes_example: c.mes_example.clone(),
            tags: c.tags.clone(),
            personality: c.personality.clone(),
        }
    }
}

/// A successfully imported card.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedCard {
    /// The character pieces.
    pub character: CardCharacter,
    /// The avatar image, if the card carried one.
    pub avatar: Option<Avatar>,
    /// The container format.
    pub format: CardFormat,
    /// The JSON shape.
    pub spec: CardSpec,
    /// Non-fatal oddities worth showing to the user.
    pub warnings: Vec<String>,
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const EMPTY_ZIP_MAGIC: &[u8] = b"PK\x05\x06";

/// Imports a card from its bytes, detecting PNG, CharX (zip) or JSON from the content.
pub fn import_card(bytes: &[u8], limits: &CardLimits) -> Result<ImportedCard, CardError> {
    if bytes.is_empty() {
        return Err(CardError::Empty);
    }
    if bytes.len() as u64 > limits.max_input_bytes {
        return Err(CardError::TooLarge {
            size: bytes.len() as u64,
            limit: limits.max_input_bytes,
        });
    }
    if bytes.starts_with(&png::SIGNATURE) {
        return import_png(bytes);
    }
    // Something that almost looks like a PNG (e.g. a mangled signature) deserves the PNG error.
    if bytes[0] == 0x89 || bytes.get(1..4) == Some(&b"PNG"[..]) {
        return Err(CardError::NotPng);
    }
    if bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(EMPTY_ZIP_MAGIC) {
        return import_charx(bytes, limits);
    }
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match text.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | Some(b'[') => {
            let parsed = parse::parse_card_bytes(bytes)?;
            Ok(ImportedCard {
                character: parsed.character,
                avatar: None,
                format: CardFormat::Json,
                spec: parsed.spec,
                warnings: parsed.warnings,
            })
        }
        _ => Err(CardError::UnknownFormat),
    }
}

fn import_png(bytes: &[u8]) -> Result<ImportedCard, CardError> {
    let image = png::parse(bytes)?;
    let texts = image.card_texts();
    let decode = |kind: png::CardChunk, text: &[u8]| {
        png::decode_text(kind, text).and_then(|json| parse::parse_card_bytes(&json))
    };
    let mut warnings = Vec::new();
    // ccv3 wins; a broken ccv3 next to a readable chara falls back rather than failing the upload.
    let parsed = match (texts.ccv3, texts.chara) {
        (Some(v3), chara) => match decode(png::CardChunk::Ccv3, v3) {
            Ok(parsed) => parsed,
            Err(e) => match chara.map(|t| decode(png::CardChunk::Chara, t)) {
                Some(Ok(parsed)) => {
                    warnings.push(format!("ccv3 chunk unreadable ({e}); used the chara chunk"));
                    parsed
                }
                _ => return Err(e),
            },
        },
        (None, Some(chara)) => decode(png::CardChunk::Chara, chara)?,
        (None, None) => return Err(CardError::NoCharacterData),
    };
    warnings.extend(parsed.warnings);
    Ok(ImportedCard {
        character: parsed.character,
        avatar: Some(Avatar {
            bytes: png::strip_card_chunks(&image),
            content_type: "image/png",
            ext: "png".to_owned(),
        }),
        format: CardFormat::Png,
        spec: parsed.spec,
        warnings,
    })
}

fn import_charx(bytes: &[u8], limits: &CardLimits) -> Result<ImportedCard, CardError> {
    let contents = charx::read(bytes, limits)?;
    let mut parsed = parse::parse_card_bytes(&contents.card_json)?;
    let mut warnings = contents.warnings;
    warnings.append(&mut parsed.warnings);
    let profile = &mut parsed.character.personality;
    // Export writes the avatar as the first asset; dropping that exact entry again keeps
    // import → export → import stable.
    if let Some(assets) = &mut profile.assets {
        let first_is_ours = assets.first().is_some_and(|first| {
            let ext = first.get("ext").and_then(Value::as_str).unwrap_or_default();
            *first == charx::icon_asset(ext)
        });
        if first_is_ours {
            assets.remove(0);
        }
        if assets.is_empty() {
            profile.assets = None;
        }
    }
    let avatar = contents.icon.map(|(bytes, ext)| Avatar {
        content_type: sniff_image(&bytes),
        ext: if ext.is_empty() {
            "png".to_owned()
        } else {
            ext
        },
        bytes,
    });
    Ok(ImportedCard {
        character: parsed.character,
        avatar,
        format: CardFormat::Charx,
        spec: parsed.spec,
        warnings,
    })
}

/// MIME type of an image from its magic bytes.
pub fn sniff_image(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(&png::SIGNATURE) {
        "image/png"
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        "image/gif"
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else {
        "application/octet-stream"
    }
}
