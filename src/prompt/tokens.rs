//! Token counting with a real BPE tokenizer (OpenAI's cl100k_base via `tiktoken-rs`).
//!
//! The ranks are compiled into the binary by `tiktoken-rs` (`include_str!`), so building a
//! [`Tokenizer`] never touches the network or the filesystem. Building it parses ~100k ranks, so
//! the server builds one at start-up and shares it through an `Arc`.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use tiktoken_rs::CoreBPE;

/// Counted texts remembered before the cache is cleared; bounds memory, not correctness.
const CACHE_CAPACITY: usize = 4096;

/// Texts longer than this (bytes) are counted in chunks; see [`Tokenizer::count_chunked`].
const CHUNK_LEN: usize = 4096;

/// Building the tokenizer failed (the embedded rank table did not parse).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the cl100k_base tokenizer: {0}")]
pub struct TokenizerError(String);

/// A shared, thread-safe BPE token counter.
pub struct Tokenizer {
    bpe: CoreBPE,
    /// Counts keyed by a hash of the text. Card descriptions, scenarios and example dialogue are
    /// recounted on every generation otherwise; a Mutex is enough because the critical section
    /// is a single map lookup.
    cache: Mutex<HashMap<u64, usize>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("encoding", &"cl100k_base")
            .finish()
    }
}

impl Tokenizer {
    /// Builds the cl100k_base tokenizer from the ranks embedded in the binary.
    pub fn cl100k() -> Result<Arc<Tokenizer>, TokenizerError> {
        let bpe = tiktoken_rs::cl100k_base().map_err(|e| TokenizerError(e.to_string()))?;
        Ok(Arc::new(Tokenizer {
            bpe,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// The number of tokens in `text`; special-token text such as `<|endoftext|>` counts as
    /// ordinary text because chat content is never allowed to inject control tokens.
    /// Every text goes through the cache: even a 5-byte one costs ~0.4–1.3 µs to BPE-count in
    /// a release build (the pre-tokenizing regex), against ~20 ns to hash and look up.
    pub fn count(&self, text: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(n) = self.lock().get(&key) {
            return *n;
        }
        let n = self.count_chunked(text);
        let mut cache = self.lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, n);
        n
    }

    /// BPE merging is quadratic in the length of one pre-tokenized piece, and a long run of
    /// letters without spaces is one piece: a pasted 100 KB blob would stall a core. Long texts
    /// are therefore counted in chunks cut just before whitespace (where cl100k_base splits
    /// anyway), which keeps the count exact for ordinary text and bounds the work for blobs.
    fn count_chunked(&self, text: &str) -> usize {
        let mut total = 0;
        let mut rest = text;
        while rest.len() > CHUNK_LEN {
            let mut cut = CHUNK_LEN;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            cut = split_point(&rest[..cut]).unwrap_or(cut);
            if cut == 0 {
                cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
            }
            total += self.bpe.encode_ordinary(&rest[..cut]).len();
            rest = &rest[cut..];
        }
        total + self.bpe.encode_ordinary(rest).len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        // A poisoned cache only holds counts, which stay valid: keep using it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One tokenizer for the whole test binary: building it is slow in debug builds.
/// Where to cut a chunk so that no cl100k_base piece straddles the cut: right after a newline
/// that precedes a non-space (newline runs end their piece), or right before a single space
/// that follows a non-space (a space starts the next word's piece). Searched in the last
/// quarter of the window only, so chunks stay large.
fn split_point(window: &str) -> Option<usize> {
    let floor = window.len() * 3 / 4;
    let mut next: Option<char> = None;
    for (i, c) in window.char_indices().rev() {
        if i < floor {
            break;
        }
        let prev = window[..i].chars().next_back();
        if c == '\n' && next.is_some_and(|n| !n.is_whitespace()) {
            return Some(i + 1);
        }
        if c == ' '
            && prev.is_some_and(|p| !p.is_whitespace())
            && next.is_some_and(|n| !n.is_whitespace())
        {
            return Some(i);
        }
        next = Some(c);
    }
    None
}

#[cfg(test)]
pub(crate) fn shared() -> Arc<Tokenizer> {
    static SHARED: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| Tokenizer::cl100k().expect("embedded ranks parse"))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: usize) {
        let t = shared();
        assert_eq!(t.count(text), expected, "{text:?}");
        // Second call goes through the cache for long texts and must agree.
        assert_eq!(t.count(text), expected, "{text:?} (cached)");
    }

    #[test]
    fn counts_known_cl100k_strings() {
        check("", 0);
        check("hello world", 2);
        check("<|endoftext|>", 7);
        // The trailing space is a token of its own.
        check(&"hello world ".repeat(20), 41);
    }

    #[test]
    fn long_texts_are_counted_in_chunks_exactly_and_blobs_fast() {
        let t = shared();
        let prose = "The quick brown fox jumps over the lazy dog.\n".repeat(400);
        assert_eq!(t.count(&prose), t.bpe.encode_ordinary(&prose).len());
        let spaced = "lorem ipsum, dolor sit amet ".repeat(600);
        assert_eq!(t.count(&spaced), t.bpe.encode_ordinary(&spaced).len());
        // One 200 KB "word": must finish quickly rather than merge quadratically.
        let blob = "x".repeat(200_000);
        let started = std::time::Instant::now();
        assert!(t.count(&blob) > 0);
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
