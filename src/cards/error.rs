//! `CardError`: everything that can be wrong with an uploaded card, a lorebook or an export.

/// Why a card, a lorebook or an export was rejected.
///
/// Messages are lowercase, have no trailing dot and say what to fix. [`CardError::is_too_large`]
/// separates size problems (HTTP 413) from malformed input (HTTP 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// Zero bytes were uploaded.
    #[error("the card is empty: upload a png, json or charx card")]
    Empty,
    /// The bytes are neither PNG, zip nor JSON.
    #[error(
        "unrecognized card format: expected a png image, a charx (zip) archive or a json object"
    )]
    UnknownFormat,
    /// The PNG signature is wrong.
    #[error("not a png file: the 8-byte png signature is missing")]
    NotPng,
    /// The first PNG chunk must be IHDR.
    #[error("invalid png: the first chunk is {0}, expected IHDR")]
    FirstChunkNotIhdr(String),
    /// The file stops in the middle of a chunk header.
    #[error("truncated png: the file ends inside a chunk header at byte {0}")]
    Truncated(usize),
    /// A chunk's declared length runs past the end of the file.
    #[error("invalid png: chunk {chunk} declares {length} bytes, past the end of the file")]
    ChunkPastEnd {
        /// Chunk type, lossily decoded.
        chunk: String,
        /// Declared data length.
        length: u64,
    },
    /// A chunk's CRC-32 does not match its type and data.
    #[error("invalid png: bad crc in chunk {0}")]
    BadCrc(String),
    /// The PNG never reaches an IEND chunk.
    #[error("invalid png: no IEND chunk, the file is probably cut short")]
    MissingIend,
    /// A valid PNG without a `chara` or `ccv3` text chunk.
    #[error("no character data in png: it has no chara or ccv3 text chunk; export the card again from its source app")]
    NoCharacterData,
    /// The card text chunk is not base64.
    #[error("invalid base64 in the {chunk} png text chunk: {reason}")]
    InvalidBase64 {
        /// `chara` or `ccv3`.
        chunk: String,
        /// Decoder message.
        reason: String,
    },
    /// The card text is not UTF-8.
    #[error("invalid utf-8 in card json: re-save the card as utf-8")]
    InvalidUtf8,
    /// The card text is not JSON.
    #[error("invalid json in card: {0}")]
    InvalidJson(String),
    /// The JSON is valid but not an object.
    #[error(
        "card json is not an object: expected {{\"spec\": ..., \"data\": {{...}}}} or a v1 object"
    )]
    NotAnObject,
    /// The card declares a spec Taproom does not read.
    #[error("unsupported card spec {0:?}: expected chara_card_v2, chara_card_v3 or a v1 card")]
    UnsupportedSpec(String),
    /// A V3 card whose `spec_version` is outside 3.0 ≤ v < 4.0.
    #[error("unsupported chara_card_v3 spec_version {0}: expected 3.x")]
    UnsupportedSpecVersion(String),
    /// The card has no usable name.
    #[error("card has no name: set data.name to a non-empty string")]
    MissingName,
    /// The card name is longer than [`super::MAX_NAME_CHARS`] characters after trimming.
    #[error("card name is {0} characters long, the limit is 128")]
    NameTooLong(usize),
    /// A zip archive without `card.json` at its root.
    #[error("charx archive has no card.json at its root")]
    MissingCardJson,
    /// The zip structure itself is broken.
    #[error("invalid charx zip: {0}")]
    InvalidZip(String),
    /// The archive declares (or actually inflates to) more bytes than allowed.
    #[error("zip bomb: the archive inflates to more than {limit} bytes ({size} bytes); shrink its assets")]
    ZipBombSize {
        /// Declared or observed uncompressed bytes.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// An entry compresses suspiciously well.
    #[error("zip bomb: entry {name} has a compression ratio of {ratio}:1, the limit is {limit}:1")]
    ZipBombRatio {
        /// Entry name.
        name: String,
        /// Observed ratio, rounded down.
        ratio: u64,
        /// The configured limit.
        limit: u64,
    },
    /// An entry name with `..` or an absolute path.
    #[error("unsafe path in charx archive: {0}")]
    UnsafeZipPath(String),
    /// The upload is larger than allowed.
    #[error("card is too large: {size} bytes, the limit is {limit} bytes")]
    TooLarge {
        /// Upload size.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A lorebook value has none of the accepted shapes.
    #[error("invalid lorebook: {0}")]
    InvalidLorebook(String),
    /// Writing a card failed (zip writer error); not the caller's fault.
    #[error("could not write the card: {0}")]
    Write(String),
}

impl CardError {
    /// True for size problems (answer 413); every other variant is malformed input (422), except
    /// [`CardError::Write`], which is an internal failure.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            CardError::TooLarge { .. }
                | CardError::ZipBombSize { .. }
                | CardError::ZipBombRatio { .. }
        )
    }
}
