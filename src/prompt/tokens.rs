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

/// Texts shorter than this are counted directly: hashing and locking would cost about as much.
const CACHE_MIN_LEN: usize = 64;

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
    pub fn count(&self, text: &str) -> usize {
        if text.len() < CACHE_MIN_LEN {
            return self.bpe.encode_ordinary(text).len();
        }
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(n) = self.lock().get(&key) {
            return *n;
        }
        let n = self.bpe.encode_ordinary(text).len();
        let mut cache = self.lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, n);
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        // A poisoned cache only holds counts, which stay valid: keep using it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One tokenizer for the whole test binary: building it is slow in debug builds.
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
}
