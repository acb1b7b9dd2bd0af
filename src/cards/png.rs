//! PNG chunk walking for character cards: validates the container (signature, IHDR first, chunk
//! bounds, CRC-32 of every chunk, IEND), reads the `chara` / `ccv3` `tEXt` chunks and rewrites
//! them without re-encoding the image. Every byte that is not a card chunk is copied verbatim.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use super::CardError;

/// The 8-byte PNG signature.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// A built-in 64x64 avatar (grey silhouette) for characters without a PNG avatar.
///
/// Generated once by a short script (zlib + CRC from Python's stdlib); `default_avatar_is_valid`
/// checks it decodes.
pub const DEFAULT_AVATAR_PNG: &[u8] = include_bytes!("default_avatar.png");

/// The PNG spec caps chunk lengths at 2^31 - 1.
const MAX_CHUNK_LEN: u64 = 0x7FFF_FFFF;

/// Padding-tolerant standard base64: SillyTavern decodes leniently, so cards in the wild
/// sometimes lack `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One chunk of a PNG, borrowed from the file.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// The 4-byte chunk type, e.g. `*b"IDAT"`.
    pub kind: [u8; 4],
    /// The chunk data (without length, type and CRC).
    pub data: &'a [u8],
    /// The whole chunk as stored: length, type, data and CRC.
    pub raw: &'a [u8],
}

impl Chunk<'_> {
    /// The chunk type as text, for error messages.
    pub fn kind_str(&self) -> String {
        String::from_utf8_lossy(&self.kind).into_owned()
    }

    /// `(keyword, text)` if this is a `tEXt` chunk with a NUL separator.
    pub fn text(&self) -> Option<(&[u8], &[u8])> {
        if &self.kind != b"tEXt" {
            return None;
        }
        let nul = self.data.iter().position(|&b| b == 0)?;
        Some((&self.data[..nul], &self.data[nul + 1..]))
    }

    /// Which card chunk this is, if any (keyword compared case-insensitively).
    pub fn card_kind(&self) -> Option<CardChunk> {
        let (keyword, _) = self.text()?;
        if keyword.eq_ignore_ascii_case(b"ccv3") {
            Some(CardChunk::Ccv3)
        } else if keyword.eq_ignore_ascii_case(b"chara") {
            Some(CardChunk::Chara)
        } else {
            None
        }
    }
}

/// The two card-carrying text chunk keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardChunk {
    /// `chara`: V1 or V2 JSON (sometimes V3 after SillyTavern re-saves a V3 card).
    Chara,
    /// `ccv3`: V3 JSON; wins over `chara`.
    Ccv3,
}

impl CardChunk {
    /// The keyword as written.
    pub fn keyword(self) -> &'static str {
        match self {
            CardChunk::Chara => "chara",
            CardChunk::Ccv3 => "ccv3",
        }
    }
}

/// A validated PNG: its chunks up to and including IEND, and any bytes after IEND.
#[derive(Debug, Clone)]
pub struct Png<'a> {
    /// Chunks in file order; the first is IHDR and the last is IEND.
    pub chunks: Vec<Chunk<'a>>,
    /// Bytes after IEND (kept on rewrite, ignored otherwise).
    pub trailing: &'a [u8],
}

/// Walks and validates every chunk of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Png<'_>, CardError> {
    if bytes.len() < SIGNATURE.len() || bytes[..SIGNATURE.len()] != SIGNATURE {
        return Err(CardError::NotPng);
    }
    let mut chunks = Vec::new();
    let mut pos = SIGNATURE.len();
    loop {
        if pos == bytes.len() {
            return Err(CardError::MissingIend);
        }
        let header = bytes.get(pos..pos + 8).ok_or(CardError::Truncated(pos))?;
        let length = u64::from(u32::from_be_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let kind = [header[4], header[5], header[6], header[7]];
        let remaining = (bytes.len() - pos - 8) as u64;
        // Data plus the 4-byte CRC must fit in what is left of the file.
        if length > MAX_CHUNK_LEN || length + 4 > remaining {
            return Err(CardError::ChunkPastEnd {
                chunk: String::from_utf8_lossy(&kind).into_owned(),
                length,
            });
        }
        let length = length as usize;
        let data = &bytes[pos + 8..pos + 8 + length];
        let crc_at = pos + 8 + length;
        let stored_crc = u32::from_be_bytes([
            bytes[crc_at],
            bytes[crc_at + 1],
            bytes[crc_at + 2],
            bytes[crc_at + 3],
        ]);
        let chunk = Chunk {
            kind,
            data,
            raw: &bytes[pos..crc_at + 4],
        };
        if chunks.is_empty() && &kind != b"IHDR" {
            return Err(CardError::FirstChunkNotIhdr(chunk.kind_str()));
        }
        if crc(&kind, data) != stored_crc {
            return Err(CardError::BadCrc(chunk.kind_str()));
        }
        chunks.push(chunk);
        pos = crc_at + 4;
        if &kind == b"IEND" {
            return Ok(Png {
                chunks,
                trailing: &bytes[pos..],
            });
        }
    }
}

/// CRC-32 over a chunk's type and data, as the PNG spec defines it.
pub fn crc(kind: &[u8; 4], data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(kind);
    hasher.update(data);
    hasher.finalize()
}

/// The card chunks found in a PNG, each still base64.
#[derive(Debug, Clone, Default)]
pub struct CardTexts<'a> {
    /// Text of the first `chara` chunk.
    pub chara: Option<&'a [u8]>,
    /// Text of the first `ccv3` chunk.
    pub ccv3: Option<&'a [u8]>,
}

impl Png<'_> {
    /// The first `chara` and `ccv3` text chunks.
    pub fn card_texts(&self) -> CardTexts<'_> {
        let mut texts = CardTexts::default();
        for chunk in &self.chunks {
            let (Some(kind), Some((_, text))) = (chunk.card_kind(), chunk.text()) else {
                continue;
            };
            let slot = match kind {
                CardChunk::Chara => &mut texts.chara,
                CardChunk::Ccv3 => &mut texts.ccv3,
            };
            if slot.is_none() {
                *slot = Some(text);
            }
        }
        texts
    }
}

/// Decodes a card chunk's base64 text into the raw JSON bytes.
pub fn decode_text(chunk: CardChunk, text: &[u8]) -> Result<Vec<u8>, CardError> {
    let result = if text.iter().any(u8::is_ascii_whitespace) {
        // Some writers wrap long base64 lines; the decoder itself rejects whitespace.
        let compact: Vec<u8> = text
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        LENIENT_BASE64.decode(compact)
    } else {
        LENIENT_BASE64.decode(text)
    };
    result.map_err(|e| CardError::InvalidBase64 {
        chunk: chunk.keyword().to_owned(),
        reason: e.to_string(),
    })
}

/// Builds a `tEXt` chunk (length, type, `keyword\0text`, CRC).
fn text_chunk(keyword: &str, text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(keyword.len() + 1 + text.len());
    data.extend_from_slice(keyword.as_bytes());
    data.push(0);
    data.extend_from_slice(text.as_bytes());
    let mut out = Vec::with_capacity(data.len() + 12);
    // Card JSON is far below 2 GiB; the caller's limits guarantee this fits in u32.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(b"tEXt");
    out.extend_from_slice(&data);
    out.extend_from_slice(&crc(b"tEXt", &data).to_be_bytes());
    out
}

/// Rewrites `png`: every existing `chara`/`ccv3` chunk is dropped, then `tEXt chara` (base64 of
/// `v2_json`) and `tEXt ccv3` (base64 of `v3_json`) are inserted right before IEND.
pub fn write_card(png: &[u8], v2_json: &str, v3_json: &str) -> Result<Vec<u8>, CardError> {
    let parsed = parse(png)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let chara = text_chunk("chara", &b64.encode(v2_json));
    let ccv3 = text_chunk("ccv3", &b64.encode(v3_json));
    let mut out = Vec::with_capacity(png.len() + chara.len() + ccv3.len());
    out.extend_from_slice(&SIGNATURE);
    for chunk in &parsed.chunks {
        if chunk.card_kind().is_some() {
            continue;
        }
        if &chunk.kind == b"IEND" {
            out.extend_from_slice(&chara);
            out.extend_from_slice(&ccv3);
        }
        out.extend_from_slice(chunk.raw);
    }
    out.extend_from_slice(parsed.trailing);
    Ok(out)
}

/// `png` without its card chunks: the plain avatar image.
pub fn strip_card_chunks(png: &Png<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&SIGNATURE);
    for chunk in png.chunks.iter().filter(|c| c.card_kind().is_none()) {
        out.extend_from_slice(chunk.raw);
    }
    out.extend_from_slice(png.trailing);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(keyword: &[u8]) -> Vec<u8> {
        let mut data = keyword.to_vec();
        data.extend_from_slice(b"\0e30=");
        data
    }

    #[test]
    fn card_keywords_are_case_insensitive() {
        let cases: [(&[u8; 4], &[u8], Option<CardChunk>); 6] = [
            (b"tEXt", b"chara", Some(CardChunk::Chara)),
            (b"tEXt", b"CHARA", Some(CardChunk::Chara)),
            (b"tEXt", b"Ccv3", Some(CardChunk::Ccv3)),
            (b"tEXt", b"chara2", None),
            (b"zTXt", b"chara", None),
            (b"iTXt", b"ccv3", None),
        ];
        for (kind, keyword, expected) in cases {
            let data = text(keyword);
            let chunk = Chunk {
                kind: *kind,
                data: &data,
                raw: &[],
            };
            assert_eq!(
                chunk.card_kind(),
                expected,
                "{:?}",
                String::from_utf8_lossy(keyword)
            );
        }
    }

    #[test]
    fn base64_padding_and_line_breaks_are_tolerated() {
        for text in [&b"e30="[..], b"e30", b"e3\n0=\r\n"] {
            assert_eq!(decode_text(CardChunk::Chara, text), Ok(b"{}".to_vec()));
        }
    }

    #[test]
    fn written_cards_replace_old_card_chunks() {
        let once = write_card(DEFAULT_AVATAR_PNG, "{\"v\":2}", "{\"v\":3}").unwrap();
        let twice = write_card(&once, "{\"v\":2}", "{\"v\":3}").unwrap();
        assert_eq!(once, twice);
        let png = parse(&once).unwrap();
        let kinds: Vec<_> = png.chunks.iter().map(|c| c.card_kind()).collect();
        assert_eq!(
            kinds,
            [
                None,
                None,
                Some(CardChunk::Chara),
                Some(CardChunk::Ccv3),
                None
            ]
        );
        assert_eq!(strip_card_chunks(&png), DEFAULT_AVATAR_PNG);
    }
}
