//! Property tests: the PNG and CharX readers never panic, on arbitrary bytes or on mutations of
//! real cards. `PROPTEST_CASES=20000 cargo test --test cards_proptest` runs a longer session.

use std::sync::OnceLock;

use proptest::prelude::*;
use taproom::cards::{self, CardLimits, NewCharacterMeta};

const SERAPHINA: &[u8] = include_bytes!("fixtures/default_Seraphina.png");

/// A small PNG card (built-in avatar + Seraphina's card) so mutations hit card chunks often.
fn small_png_card() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(build_png_card)
}

fn build_png_card() -> Vec<u8> {
    let card = cards::import_card(SERAPHINA, &CardLimits::default()).unwrap();
    let c = card.character.into_character(NewCharacterMeta {
        id: "p".into(),
        creator_id: "p".into(),
        now: "2026-01-01T00:00:00Z".into(),
        avatar_url: None,
        is_public: false,
    });
    cards::export_png(&c, None).unwrap()
}

fn small_charx() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(build_charx)
}

fn build_charx() -> Vec<u8> {
    let card = cards::import_card(SERAPHINA, &CardLimits::default()).unwrap();
    let c = card.character.into_character(NewCharacterMeta {
        id: "p".into(),
        creator_id: "p".into(),
        now: "2026-01-01T00:00:00Z".into(),
        avatar_url: None,
        is_public: false,
    });
    cards::export_charx(&c, Some((cards::png::DEFAULT_AVATAR_PNG, "png"))).unwrap()
}

/// Edits applied to a seed: overwrite a byte, truncate, or insert bytes.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            6 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
            1 => any::<usize>().prop_map(Edit::Truncate),
            2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(i, b)| Edit::Insert(i, b)),
        ],
        1..8,
    )
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match edit {
            Edit::Set(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % len] = *b;
                }
            }
            Edit::Truncate(i) => bytes.truncate(i % len),
            Edit::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

fn limits() -> CardLimits {
    CardLimits {
        max_uncompressed_bytes: 1 << 20,
        ..CardLimits::default()
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = cards::png::parse(&bytes);
        let _ = cards::charx::read(&bytes, &limits());
        let _ = cards::import_card(&bytes, &limits());
    }

    #[test]
    fn arbitrary_bytes_behind_magic_never_panic(
        magic in prop_oneof![Just(&b"\x89PNG\r\n\x1a\n"[..]), Just(&b"PK\x03\x04"[..]), Just(&b"{"[..])],
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut input = magic.to_vec();
        input.extend(bytes);
        let _ = cards::import_card(&input, &limits());
    }

    #[test]
    fn mutated_png_cards_never_panic(edits in edits()) {
        let bytes = mutate(small_png_card(), &edits);
        let _ = cards::png::parse(&bytes);
        let _ = cards::import_card(&bytes, &limits());
    }

    #[test]
    fn mutated_charx_cards_never_panic(edits in edits()) {
        let bytes = mutate(small_charx(), &edits);
        let _ = cards::charx::read(&bytes, &limits());
        let _ = cards::import_card(&bytes, &limits());
    }
}
