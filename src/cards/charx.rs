//! CharX (`.charx`): a zip with `card.json` (V3) at the root and assets under `assets/`.
//!
//! Reading checks the central directory before inflating anything (declared total size, per-entry
//! compression ratio, `..` and absolute paths) and enforces the size limit again while inflating,
//! because local headers can lie about sizes.

use std::io::{Cursor, Read, Write};

use serde_json::{json, Value};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use super::{export, CardError, CardLimits};
use crate::model::Character;

/// Where the exported avatar lives inside the archive (without the extension).
const ICON_PATH: &str = "assets/icon/images/main";
/// The CharX spec's own (misspelled) scheme for in-archive assets.
const EMBEDDED_SCHEME: &str = "embeded://";
/// The correctly spelled scheme some writers use.
const EMBEDDED_SCHEME_ALT: &str = "embedded://";

/// What a CharX archive holds for Taproom: the raw `card.json` and the icon bytes.
#[derive(Debug, Clone)]
pub struct CharxContents {
    /// `card.json` bytes.
    pub card_json: Vec<u8>,
    /// The first `icon` asset: `(bytes, ext)`.
    pub icon: Option<(Vec<u8>, String)>,
    /// Non-fatal oddities.
    pub warnings: Vec<String>,
}

/// True for names that could escape an extraction directory.
fn unsafe_path(name: &str) -> bool {
    let normalized = name.replace('\\', "/");
    normalized.starts_with('/')
        || normalized.split('/').any(|part| part == "..")
        || normalized.as_bytes().get(1) == Some(&b':')
}

/// Validates the central directory of `bytes` and reads `card.json` and the icon asset.
pub fn read(bytes: &[u8], limits: &CardLimits) -> Result<CharxContents, CardError> {
    let mut archive =
        ZipArchive::new(Cursor::new(bytes)).map_err(|e| CardError::InvalidZip(e.to_string()))?;
    check_directory(&archive, limits)?;

    let mut budget = limits.max_uncompressed_bytes;
    let card_index = archive
        .index_for_name("card.json")
        .ok_or(CardError::MissingCardJson)?;
    let card_json = read_entry(&mut archive, card_index, &mut budget, limits)?;

    let mut warnings = Vec::new();
    let icon = match icon_path(&card_json) {
        Some((path, ext)) => match archive.index_for_name(&path) {
            Some(index) => Some((read_entry(&mut archive, index, &mut budget, limits)?, ext)),
            None => {
                warnings.push(format!("icon asset {path} is not in the archive"));
                None
            }
        },
        None => None,
    };
    Ok(CharxContents {
        card_json,
        icon,
        warnings,
    })
}

/// Checks every entry's name, declared size and ratio before anything is inflated.
fn check_directory(
    archive: &ZipArchive<Cursor<&[u8]>>,
    limits: &CardLimits,
) -> Result<(), CardError> {
    let meta = archive.metadata();
    let mut total: u64 = 0;
    for index in 0..meta.len() {
        let entry = meta
            .entry(index)
            .map_err(|e| CardError::InvalidZip(e.to_string()))?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if unsafe_path(&name) || entry.enclosed_name().is_none() {
            return Err(CardError::UnsafeZipPath(name));
        }
        let size = entry.size();
        total = total.saturating_add(size);
        if total > limits.max_uncompressed_bytes {
            return Err(CardError::ZipBombSize {
                size: total,
                limit: limits.max_uncompressed_bytes,
            });
        }
        // Tiny entries cannot exhaust memory, and short runs of whitespace legitimately compress
        // past 100:1, so the ratio is only judged on entries big enough to matter.
        if size >= limits.ratio_check_min_bytes {
            let ratio = size / entry.compressed_size().max(1);
            if ratio > limits.max_compression_ratio {
                return Err(CardError::ZipBombRatio {
                    name,
                    ratio,
                    limit: limits.max_compression_ratio,
                });
            }
        }
    }
    Ok(())
}

/// Inflates one entry, never producing more than the remaining `budget`.
fn read_entry(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    index: usize,
    budget: &mut u64,
    limits: &CardLimits,
) -> Result<Vec<u8>, CardError> {
    let file = archive
        .by_index(index)
        .map_err(|e| CardError::InvalidZip(e.to_string()))?;
    let mut out = Vec::new();
    // One byte over the budget is enough to know the headers lied.
    file.take(budget.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| CardError::InvalidZip(e.to_string()))?;
    let read = out.len() as u64;
    if read > *budget {
        return Err(CardError::ZipBombSize {
            size: limits
                .max_uncompressed_bytes
                .saturating_sub(*budget)
                .saturating_add(read),
            limit: limits.max_uncompressed_bytes,
        });
    }
    *budget -= read;
    Ok(out)
}

/// The archive path and extension of the first `icon` asset with an embedded uri.
fn icon_path(card_json: &[u8]) -> Option<(String, String)> {
    let value: Value = serde_json::from_slice(card_json).ok()?;
    let assets = value.get("data")?.get("assets")?.as_array()?;
    let icon = assets
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("icon"))?;
    let uri = icon.get("uri")?.as_str()?;
    let path = uri
        .strip_prefix(EMBEDDED_SCHEME)
        .or_else(|| uri.strip_prefix(EMBEDDED_SCHEME_ALT))?;
    let ext = icon
        .get("ext")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| path.rsplit_once('.').map(|(_, e)| e.to_owned()))
        .unwrap_or_default();
    Some((path.to_owned(), ext))
}

/// The `assets[]` entry Taproom writes for the avatar; import drops it again when it comes first.
pub(crate) fn icon_asset(ext: &str) -> Value {
    json!({
        "type": "icon",
        "uri": format!("{EMBEDDED_SCHEME}{ICON_PATH}.{ext}"),
        "name": "main",
        "ext": ext,
    })
}

/// Keeps an extension only if it is short and alphanumeric, so it is safe in a zip path.
fn clean_ext(ext: &str) -> String {
    let ext = ext.trim_start_matches('.').to_ascii_lowercase();
    if !ext.is_empty() && ext.len() <= 5 && ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        ext
    } else {
        "png".to_owned()
    }
}

/// `c` as a CharX archive: `card.json` (V3) and, when given, the avatar under
/// `assets/icon/images/main.<ext>` referenced by the first `assets` entry.
pub fn export_charx(c: &Character, avatar: Option<(&[u8], &str)>) -> Result<Vec<u8>, CardError> {
    let mut card = export::to_v3_json(c);
    let avatar = avatar.map(|(bytes, ext)| (bytes, clean_ext(ext)));
    if let (Some((_, ext)), Some(data)) = (&avatar, card.get_mut("data")) {
        let mut assets = vec![icon_asset(ext)];
        if let Some(Value::Array(existing)) = data.get("assets") {
            assets.extend(existing.iter().cloned());
        }
        data["assets"] = Value::Array(assets);
    }
    let write_err = |e: zip::result::ZipError| CardError::Write(e.to_string());
    // A fixed timestamp keeps exports reproducible and this module free of clock reads.
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file("card.json", options).map_err(write_err)?;
    zip.write_all(card.to_string().as_bytes())
        .map_err(|e| CardError::Write(e.to_string()))?;
    if let Some((bytes, ext)) = avatar {
        // Images are already compressed; storing them avoids wasted work.
        let stored = options.compression_method(CompressionMethod::Stored);
        zip.start_file(format!("{ICON_PATH}.{ext}"), stored)
            .map_err(write_err)?;
        zip.write_all(bytes)
            .map_err(|e| CardError::Write(e.to_string()))?;
    }
    Ok(zip.finish().map_err(write_err)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_recognized() {
        let cases = [
            ("card.json", false),
            ("assets/icon/images/main.png", false),
            ("assets/..hidden/x", false),
            ("../evil", true),
            ("a/../../evil", true),
            ("a\\..\\evil", true),
            ("/etc/passwd", true),
            ("\\server\\share", true),
            ("C:/windows", true),
        ];
        for (name, expected) in cases {
            assert_eq!(unsafe_path(name), expected, "{name}");
        }
    }

    #[test]
    fn reads_stop_at_the_remaining_budget_whatever_the_headers_say() {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        zip.start_file("a.bin", options).unwrap();
        zip.write_all(&[7u8; 5000]).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let mut archive = ZipArchive::new(Cursor::new(&bytes[..])).unwrap();
        let limits = CardLimits::default();
        let mut budget = 100;
        let err = read_entry(&mut archive, 0, &mut budget, &limits).unwrap_err();
        assert!(matches!(err, CardError::ZipBombSize { .. }), "{err}");
        let mut budget = 5000;
        assert_eq!(
            read_entry(&mut archive, 0, &mut budget, &limits)
                .unwrap()
                .len(),
            5000
        );
        assert_eq!(budget, 0);
    }

    #[test]
    fn extensions_are_sanitized() {
        let cases = [
            ("png", "png"),
            (".WEBP", "webp"),
            ("../x", "png"),
            ("", "png"),
            ("jpeg", "jpeg"),
        ];
        for (input, expected) in cases {
            assert_eq!(clean_ext(input), expected, "{input}");
        }
    }
}
