//! Any bytes through the PNG walker and the card importer: no panic, and every card that imports
//! exports to a PNG that imports to the same character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taproom::cards::{self, CardLimits, NewCharacterMeta};

fuzz_target!(|data: &[u8]| {
    let _ = cards::png::parse(data);
    let Ok(card) = cards::import_card(data, &CardLimits::default()) else {
        return;
    };
    let character = card.character.clone().into_character(NewCharacterMeta {
        id: "fuzz".into(),
        creator_id: "fuzz".into(),
        now: "2026-01-01T00:00:00Z".into(),
        avatar_url: None,
        is_public: false,
    });
    let avatar = card.avatar.as_ref().map(|a| a.bytes.as_slice());
    let png = cards::export_png(&character, avatar).expect("export of an imported card");
    let again = cards::import_card(&png, &CardLimits::default()).expect("re-import");
    assert_eq!(again.character, card.character);
});
