//! Card import/export: fixtures from a real SillyTavern, generated cards, hostile inputs.
#![recursion_limit = "256"]
//! Everything calls `taproom::cards` directly; the module is pure, so no server is needed.

use std::io::{Cursor, Write};

use base64::Engine as _;
use serde_json::{json, Value};
use taproom::cards::{self, CardError, CardFormat, CardLimits, CardSpec, ImportedCard};
use taproom::model::{Character, CharacterBook, LorebookEntry};

const SERAPHINA: &[u8] = include_bytes!("fixtures/default_Seraphina.png");
const FLUX: &[u8] = include_bytes!("fixtures/default_FluxTheCat.png");
const AQUA_V1: &[u8] = include_bytes!("fixtures/v1_Aqua.png");
const AQUA_V2_V3: &[u8] = include_bytes!("fixtures/st_export_Aqua_v2_v3.png");
const NO_CARD: &[u8] = include_bytes!("fixtures/user-default.png");
const ELDORIA: &str = include_str!("fixtures/Eldoria.json");

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn import(bytes: &[u8]) -> ImportedCard {
    match cards::import_card(bytes, &CardLimits::default()) {
        Ok(card) => card,
        Err(e) => panic!("import failed: {e}"),
    }
}

fn import_err(bytes: &[u8]) -> CardError {
    match cards::import_card(bytes, &CardLimits::default()) {
        Ok(card) => panic!("expected an error, imported {:?}", card.character.name),
        Err(e) => e,
    }
}

fn character(card: &ImportedCard) -> Character {
    card.character
        .clone()
        .into_character(cards::NewCharacterMeta {
            id: "0193a000-0000-7000-8000-000000000001".into(),
            creator_id: "user-a".into(),
            now: "2026-11-26T10:00:00Z".into(),
            avatar_url: None,
            is_public: false,
        })
}

fn top_level(card: &ImportedCard) -> serde_json::Map<String, Value> {
    match card.character.personality.extra.get("cardTopLevel") {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    }
}

// ---------------------------------------------------------------- a tiny independent PNG reader

/// Chunks as `(type, data)`, verifying every CRC and the IHDR..IEND frame; written here
/// independently of `cards::png` so the exporter is checked against a second implementation.
fn read_chunks(bytes: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut pos = 8;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
        let data = bytes[pos + 8..pos + 8 + len].to_vec();
        let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
        let mut h = crc32fast::Hasher::new();
        h.update(&kind);
        h.update(&data);
        assert_eq!(
            h.finalize(),
            crc,
            "crc of {}",
            String::from_utf8_lossy(&kind)
        );
        out.push((kind, data));
        pos += 12 + len;
        if &kind == b"IEND" {
            break;
        }
    }
    assert_eq!(&out[0].0, b"IHDR");
    assert_eq!(&out.last().unwrap().0, b"IEND");
    out
}

fn chunk_bytes(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
    out
}

fn text_data(keyword: &str, text: &str) -> Vec<u8> {
    let mut d = keyword.as_bytes().to_vec();
    d.push(0);
    d.extend_from_slice(text.as_bytes());
    d
}

/// A PNG made of the built-in avatar's IHDR/IDAT plus `extra` chunks before IEND.
fn png_with(extra: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let base = read_chunks(cards::png::DEFAULT_AVATAR_PNG);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in &base {
        if kind == b"IEND" {
            for (k, d) in extra {
                out.extend(chunk_bytes(k, d));
            }
        }
        out.extend(chunk_bytes(kind, data));
    }
    out
}

fn card_png(keyword: &str, card: &Value) -> Vec<u8> {
    png_with(&[(*b"tEXt", text_data(keyword, &B64.encode(card.to_string())))])
}

// ---------------------------------------------------------------- fixtures

#[test]
fn seraphina_imports_as_v2_png_with_its_lorebook_and_string_talkativeness() {
    let card = import(SERAPHINA);
    assert_eq!(card.format, CardFormat::Png);
    assert_eq!(card.spec, CardSpec::V2);
    let c = &card.character;
    assert_eq!(c.name, "Seraphina");
    assert!(c.description.starts_with("[Seraphina's Personality="));
    assert!(c.first_mes.starts_with("*You wake with a start"));
    let p = &c.personality;
    assert_eq!(p.extensions["talkativeness"], json!("0.5"));
    assert_eq!(p.extensions["world"], json!("Eldoria"));
    assert_eq!(p.extensions["fav"], json!(false));
    assert_eq!(p.creator.as_deref(), Some("OtisAlejandro"));
    assert_eq!(p.character_version.as_deref(), Some("1.0.0"));
    assert_eq!(
        p.creator_notes.as_deref(),
        Some("ST Default Bot contest winner: roleplay bots category")
    );
    let book = p.character_book.as_ref().expect("lorebook");
    assert_eq!(book.name.as_deref(), Some("Eldoria"));
    assert_eq!(book.entries.len(), 4);
    assert_eq!(book.entries[0].keys[0], "eldoria");
    assert_eq!(book.entries[0].extensions["position"], json!(0));
    assert_eq!(book.entries[0].extensions["probability"], Value::Null);
    // SillyTavern's V1 mirror extras.
    assert_eq!(p.avatar.as_deref(), Some("none"));
    assert_eq!(
        p.chat.as_deref(),
        Some("Seraphina - 2023-5-12 @21h 32m 29s 224ms")
    );
    let top = top_level(&card);
    assert_eq!(top["create_date"], json!("2023-5-12 @21h 32m 29s 228ms"));
    assert_eq!(top["talkativeness"], json!("0.5"));
    assert_eq!(top["fav"], json!(false));
    // The avatar is the same image without the card chunk.
    let avatar = card.avatar.as_ref().expect("avatar");
    assert_eq!(avatar.content_type, "image/png");
    let chunks = read_chunks(&avatar.bytes);
    assert!(chunks.iter().all(|(k, _)| k != b"tEXt"));
    assert_eq!(chunks.len(), 3);
}

#[test]
fn flux_keeps_post_history_instructions_and_its_top_level_tag_string() {
    let card = import(FLUX);
    assert_eq!(card.spec, CardSpec::V2);
    let p = &card.character.personality;
    assert_eq!(card.character.name, "Flux the Cat");
    assert!(p
        .post_history_instructions
        .as_deref()
        .unwrap()
        .starts_with("[System note"));
    assert!(p.character_book.is_none());
    assert_eq!(p.extensions["world"], json!(""));
    assert!(card.character.tags.is_empty());
    assert_eq!(top_level(&card)["tags"], json!(""));
    assert_eq!(p.creator.as_deref(), Some("@kallmeflocc on Discord"));
}

#[test]
fn v1_aqua_imports_as_v1_keeping_its_extras() {
    let card = import(AQUA_V1);
    assert_eq!(card.spec, CardSpec::V1);
    let c = &card.character;
    assert_eq!(c.name, "Aqua");
    assert_eq!(
        c.scenario,
        "Aqua is standing in the city square and is looking for new followers"
    );
    assert!(c.mes_example.starts_with("<START>"));
    assert_eq!(
        c.personality.personality,
        "high-spirited, likes to party, carefree, cheerful."
    );
    assert_eq!(c.personality.avatar.as_deref(), Some("none"));
    assert_eq!(c.personality.chat.as_deref(), Some("1677261616514"));
    assert_eq!(top_level(&card)["create_date"], json!("1674407315376"));
    // The PNG has pHYs and many IDAT chunks; all of them survive into the avatar.
    let chunks = read_chunks(&card.avatar.as_ref().unwrap().bytes);
    assert_eq!(&chunks[1].0, b"pHYs");
    assert_eq!(chunks.len(), 52);
}

#[test]
fn sillytavern_export_with_both_chunks_is_read_from_ccv3() {
    let card = import(AQUA_V2_V3);
    assert_eq!(card.spec, CardSpec::V3);
    let p = &card.character.personality;
    assert_eq!(p.extensions["talkativeness"], json!(0.5));
    assert_eq!(p.extensions["depth_prompt"]["depth"], json!(4));
    assert_eq!(top_level(&card)["talkativeness"], json!(0.5));
    assert_eq!(p.creatorcomment.as_deref(), Some(""));
}

#[test]
fn ccv3_wins_when_the_chunks_disagree() {
    let v2 = json!({"spec":"chara_card_v2","spec_version":"2.0","data":{"name":"From chara"}});
    let v3 = json!({"spec":"chara_card_v3","spec_version":"3.0","data":{"name":"From ccv3"}});
    let png = png_with(&[
        (*b"tEXt", text_data("chara", &B64.encode(v2.to_string()))),
        (*b"tEXt", text_data("CCV3", &B64.encode(v3.to_string()))),
    ]);
    let card = import(&png);
    assert_eq!(card.character.name, "From ccv3");
    assert_eq!(card.spec, CardSpec::V3);
}

#[test]
fn chara_chunk_holding_v3_json_is_read_as_v3() {
    let v3 =
        json!({"spec":"chara_card_v3","spec_version":3.0,"data":{"name":"Resaved","nickname":"R"}});
    let card = import(&card_png("chara", &v3));
    assert_eq!(card.spec, CardSpec::V3);
    assert_eq!(card.character.personality.nickname.as_deref(), Some("R"));
}

#[test]
fn png_without_a_card_is_rejected_clearly() {
    let err = import_err(NO_CARD);
    assert_eq!(err, CardError::NoCharacterData);
    assert!(err.to_string().starts_with("no character data in png"));
    assert!(!err.is_too_large());
}

// ---------------------------------------------------------------- round trips

/// import → export (png, v3 json, v2 json, charx) → import must give equal character data.
fn assert_round_trips(original: &ImportedCard) {
    let c = character(original);
    let avatar = original.avatar.as_ref().map(|a| a.bytes.as_slice());
    let exports: Vec<(&str, Vec<u8>)> = vec![
        ("png", cards::export_png(&c, avatar).unwrap()),
        ("v3 json", cards::to_v3_json(&c).to_string().into_bytes()),
        ("v2 json", cards::to_v2_json(&c).to_string().into_bytes()),
        (
            "charx",
            cards::export_charx(&c, avatar.map(|a| (a, "png"))).unwrap(),
        ),
        (
            "charx without avatar",
            cards::export_charx(&c, None).unwrap(),
        ),
    ];
    for (label, bytes) in exports {
        let again = import(&bytes);
        assert_eq!(
            again.character, original.character,
            "round trip via {label}"
        );
        // A second export of the re-import is byte-identical JSON: nothing drifts.
        assert_eq!(
            cards::to_v3_json(&character(&again)),
            cards::to_v3_json(&c),
            "{label}"
        );
    }
    if let Some(avatar) = avatar {
        let png = cards::export_png(&c, Some(avatar)).unwrap();
        let expected = if avatar.starts_with(b"\x89PNG") {
            avatar
        } else {
            cards::png::DEFAULT_AVATAR_PNG
        };
        assert_eq!(import(&png).avatar.unwrap().bytes, expected, "png avatar");
        let zip = cards::export_charx(&c, Some((avatar, "png"))).unwrap();
        assert_eq!(
            import(&zip).avatar.unwrap().bytes,
            avatar,
            "charx avatar survives"
        );
    }
}

#[test]
fn every_fixture_round_trips_through_every_export_format() {
    for fixture in [SERAPHINA, FLUX, AQUA_V1, AQUA_V2_V3] {
        assert_round_trips(&import(fixture));
    }
}

fn generated_v3() -> Value {
    json!({
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            "name": "Zoë 🦊 狐狸",
            "description": "A fox spirit — «quoted» and \u{1F600}",
            "personality": "sly",
            "scenario": "a shrine",
            "first_mes": "*{{char}} waves at {{user}}* 👋",
            "mes_example": "<START>\n{{user}}: hi\n{{char}}: こんにちは",
            "creator_notes": "notes",
            "system_prompt": "{{original}} Stay in character.",
            "post_history_instructions": "Be brief.",
            "alternate_greetings": ["hello", "hey"],
            "tags": ["fox", "myth"],
            "creator": "someone",
            "character_version": "3.1",
            "extensions": {"talkativeness": "0.7", "custom": {"nested": [1, 2, {"x": null}]}},
            "nickname": "Zo",
            "creator_notes_multilingual": {"ja": "ノート"},
            "source": ["https://example.com/zoe"],
            "group_only_greetings": ["hi all"],
            "creation_date": 1700000000,
            "modification_date": 1700000500,
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"},
                       {"type": "background", "uri": "https://example.com/bg.png", "name": "bg", "ext": "png"}],
            "x_unknown_data_key": {"kept": true},
            "character_book": {
                "name": "Shrine",
                "scan_depth": 3,
                "extensions": {"foo": 1},
                "entries": [
                    {"id": "e1", "keys": ["shrine"], "content": "@@activate\nThe shrine is old.",
                     "extensions": {"position": 4, "depth": 2, "role": 1}, "enabled": true,
                     "insertion_order": 10, "use_regex": true, "position": "after_char"},
                    {"id": 7, "keys": ["/fox(es)?/i"], "content": "@@dont_activate\nFoxes.",
                     "extensions": {}, "enabled": false, "insertion_order": 5, "priority": 3,
                     "name": "foxes", "case_sensitive": true, "unknown_entry_key": "x"}
                ]
            }
        }
    })
}

#[test]
fn generated_v3_with_unicode_emoji_decorators_and_every_v3_field_round_trips() {
    let card = import(generated_v3().to_string().as_bytes());
    assert_eq!(card.format, CardFormat::Json);
    assert_eq!(card.spec, CardSpec::V3);
    let p = &card.character.personality;
    assert_eq!(card.character.name, "Zoë 🦊 狐狸");
    assert_eq!(p.nickname.as_deref(), Some("Zo"));
    assert_eq!(p.creation_date, Some(1_700_000_000));
    assert_eq!(p.assets.as_ref().unwrap().len(), 2);
    assert_eq!(
        p.extra["cardData"]["x_unknown_data_key"],
        json!({"kept": true})
    );
    let book = p.character_book.as_ref().unwrap();
    assert_eq!(book.entries[0].id, Some(json!("e1")));
    assert!(book.entries[0].content.starts_with("@@activate\n"));
    assert_eq!(book.entries[1].extra["unknown_entry_key"], json!("x"));
    assert_round_trips(&card);
}

#[test]
fn generated_v2_and_v1_and_pygmalion_round_trip() {
    let v2 = json!({"spec":"chara_card_v2","spec_version":"2.0","data":{
        "name":"Bob","description":"d","personality":"p","scenario":"s","first_mes":"f",
        "mes_example":"m","creator_notes":"","system_prompt":"","post_history_instructions":"",
        "alternate_greetings":[],"tags":"a, b ,,c","creator":"","character_version":"",
        "extensions":{}}});
    let card = import(v2.to_string().as_bytes());
    assert_eq!(card.spec, CardSpec::V2);
    assert_eq!(card.character.tags, ["a", "b", "c"]);
    assert_round_trips(&card);

    let v1 = json!({"name":"Old","description":"d","first_mes":"hi","talkativeness":"0.3",
        "fav":true,"creatorcomment":"cc","create_date":"1674407315376","tags":["x"]});
    let card = import(v1.to_string().as_bytes());
    assert_eq!(card.spec, CardSpec::V1);
    assert_eq!(card.character.personality.personality, "");
    assert_eq!(
        card.character.personality.creatorcomment.as_deref(),
        Some("cc")
    );
    assert_eq!(top_level(&card)["fav"], json!(true));
    assert_round_trips(&card);

    let pyg = json!({"char_name":"Pyg","char_persona":"persona","char_greeting":"hello",
        "example_dialogue":"<START>","world_scenario":"world","extra_thing":1});
    let card = import(pyg.to_string().as_bytes());
    assert_eq!(card.spec, CardSpec::Pygmalion);
    let c = &card.character;
    assert_eq!(
        (c.name.as_str(), c.description.as_str()),
        ("Pyg", "persona")
    );
    assert_eq!(
        (c.first_mes.as_str(), c.scenario.as_str()),
        ("hello", "world")
    );
    assert_eq!(c.mes_example, "<START>");
    assert_round_trips(&card);
}

#[test]
fn wrongly_typed_fields_are_kept_verbatim_and_round_trip() {
    let v2 = json!({"spec":"chara_card_v2","data":{"name":"Odd","description":42,
        "tags":[1,"a"],"extensions":"nope","creation_date":"yesterday"},
        "description":42,"name":"Different top-level name"});
    let card = import(v2.to_string().as_bytes());
    let p = &card.character.personality;
    assert_eq!(card.character.description, "");
    assert_eq!(p.extra["cardData"]["description"], json!(42));
    assert_eq!(p.extra["cardData"]["extensions"], json!("nope"));
    assert_eq!(top_level(&card)["name"], json!("Different top-level name"));
    assert!(!card.warnings.is_empty());
    assert_round_trips(&card);
}

#[test]
fn a_thousand_entry_lorebook_round_trips() {
    let entries: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"id": i, "keys": [format!("key{i}"), format!("alias {i}")],
                   "secondary_keys": [format!("s{}", i * 7)],
                   "content": format!("Entry {i}: {}", "lore ".repeat(i % 13)),
                   "extensions": {"position": i % 7, "depth": 4, "selectiveLogic": i % 4,
                                  "probability": 100, "useProbability": true, "group": format!("g{}", i % 5)},
                   "enabled": i % 3 != 0, "insertion_order": i, "selective": true,
                   "constant": i % 10 == 0, "position": if i % 7 == 0 {"before_char"} else {"after_char"},
                   "comment": format!("c{i}")})
        })
        .collect();
    let v2 = json!({"spec":"chara_card_v2","spec_version":"2.0",
        "data":{"name":"Big Book","character_book":{"name":"big","entries":entries}}});
    let card = import(v2.to_string().as_bytes());
    assert_eq!(
        card.character
            .personality
            .character_book
            .as_ref()
            .unwrap()
            .entries
            .len(),
        1000
    );
    assert_round_trips(&card);
    // And through World Info and back.
    let book = card.character.personality.character_book.clone().unwrap();
    let wi = cards::lorebook_to_worldinfo(&book);
    assert_eq!(wi["entries"].as_object().unwrap().len(), 1000);
    assert_eq!(cards::parse_lorebook(&wi).unwrap(), book);
}

// ---------------------------------------------------------------- exported PNG, checked independently

#[test]
fn exported_png_has_chara_then_ccv3_before_iend_and_untouched_image_chunks() {
    let card = import(AQUA_V2_V3);
    let c = character(&card);
    let exported = cards::export_png(&c, Some(AQUA_V2_V3)).unwrap();
    let before = read_chunks(AQUA_V2_V3);
    let after = read_chunks(&exported);
    let n = after.len();
    assert_eq!(&after[n - 1].0, b"IEND");
    assert_eq!(&after[n - 3].0, b"tEXt");
    assert_eq!(&after[n - 2].0, b"tEXt");
    let texts: Vec<(String, Value)> = after[n - 3..n - 1]
        .iter()
        .map(|(_, d)| {
            let nul = d.iter().position(|&b| b == 0).unwrap();
            let json = B64.decode(&d[nul + 1..]).unwrap();
            (
                String::from_utf8(d[..nul].to_vec()).unwrap(),
                serde_json::from_slice(&json).unwrap(),
            )
        })
        .collect();
    assert_eq!(texts[0].0, "chara");
    assert_eq!(texts[0].1["spec"], "chara_card_v2");
    assert_eq!(texts[1].0, "ccv3");
    assert_eq!(texts[1].1["spec"], "chara_card_v3");
    assert_eq!(texts[1].1["spec_version"], "3.0");
    assert_eq!(texts[0].1["data"], texts[1].1["data"]);
    assert_eq!(texts[1].1["data"]["name"], "Aqua");
    // Exactly one card chunk of each kind: the old ones are gone.
    let card_chunks = after.iter().filter(|(k, _)| k == b"tEXt").count();
    assert_eq!(card_chunks, 2);
    // Every non-card chunk is byte-identical and in the same order.
    let plain = |chunks: &[([u8; 4], Vec<u8>)]| -> Vec<([u8; 4], Vec<u8>)> {
        chunks
            .iter()
            .filter(|(k, _)| k != b"tEXt")
            .cloned()
            .collect()
    };
    assert_eq!(plain(&before), plain(&after));
}

#[test]
fn export_png_keeps_foreign_text_chunks_and_falls_back_to_default_avatar() {
    let old = json!({"name": "Old"});
    let avatar = png_with(&[
        (*b"tEXt", text_data("Software", "paint")),
        (*b"tEXt", text_data("Chara", &B64.encode(old.to_string()))),
    ]);
    let c = character(&import(generated_v3().to_string().as_bytes()));
    let out = read_chunks(&cards::export_png(&c, Some(&avatar)).unwrap());
    let texts: Vec<&[u8]> = out
        .iter()
        .filter(|(k, _)| k == b"tEXt")
        .map(|(_, d)| &d[..d.iter().position(|&b| b == 0).unwrap()])
        .collect();
    assert_eq!(texts, [&b"Software"[..], b"chara", b"ccv3"]);

    // A JPEG avatar (or none) gets the built-in image.
    let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 0, 0];
    for avatar in [Some(&jpeg[..]), None] {
        let png = cards::export_png(&c, avatar).unwrap();
        let card = import(&png);
        assert_eq!(card.avatar.unwrap().bytes, cards::png::DEFAULT_AVATAR_PNG);
    }
}

#[test]
fn default_avatar_is_a_valid_decodable_png() {
    let img = image::load_from_memory(cards::png::DEFAULT_AVATAR_PNG).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    assert!(cards::png::parse(cards::png::DEFAULT_AVATAR_PNG).is_ok());
}

// ---------------------------------------------------------------- bad input

#[test]
fn broken_pngs_give_the_right_errors() {
    let good = card_png("chara", &json!({"name": "X"}));
    assert_eq!(import_err(b"\x89PNX\r\n\x1a\n0000"), CardError::NotPng);
    assert_eq!(import_err(b"\x89PNG\n\x1a\n0000"), CardError::NotPng);
    assert_eq!(
        cards::png::parse(b"\x89PNX\r\n\x1a\n").unwrap_err(),
        CardError::NotPng
    );

    let mut bad_crc = good.clone();
    let last_crc = bad_crc.len() - 20; // inside the tEXt chunk's CRC (IEND is the last 12 bytes)
    bad_crc[last_crc] ^= 0xFF;
    assert_eq!(import_err(&bad_crc), CardError::BadCrc("tEXt".into()));

    assert_eq!(import_err(&good[..good.len() - 12]), CardError::MissingIend);
    assert!(matches!(
        import_err(&good[..good.len() - 6]),
        CardError::Truncated(_)
    ));
    assert!(matches!(
        import_err(&good[..good.len() - 14]),
        CardError::ChunkPastEnd { ref chunk, .. } if chunk == "tEXt"
    ));

    let mut huge_len = good.clone();
    huge_len[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
    assert!(matches!(
        import_err(&huge_len),
        CardError::ChunkPastEnd { .. }
    ));

    let mut no_ihdr = b"\x89PNG\r\n\x1a\n".to_vec();
    no_ihdr.extend(chunk_bytes(b"IDAT", b"x"));
    no_ihdr.extend(chunk_bytes(b"IEND", b""));
    assert_eq!(
        import_err(&no_ihdr),
        CardError::FirstChunkNotIhdr("IDAT".into())
    );

    let bad_b64 = png_with(&[(*b"tEXt", text_data("chara", "!!!not base64!!!"))]);
    assert!(
        matches!(import_err(&bad_b64), CardError::InvalidBase64 { ref chunk, .. } if chunk == "chara")
    );

    let bad_utf8 = png_with(&[(
        *b"tEXt",
        text_data("chara", &B64.encode([b'{', 0xFF, b'}'])),
    )]);
    assert_eq!(import_err(&bad_utf8), CardError::InvalidUtf8);

    let not_json = png_with(&[(*b"tEXt", text_data("ccv3", &B64.encode("{oops")))]);
    assert!(matches!(import_err(&not_json), CardError::InvalidJson(_)));
}

#[test]
fn broken_json_cards_give_the_right_errors() {
    assert_eq!(import_err(b""), CardError::Empty);
    assert_eq!(import_err(b"GIF89a...."), CardError::UnknownFormat);
    assert_eq!(import_err(b"[1,2]"), CardError::NotAnObject);
    assert_eq!(
        cards::parse::parse_card_bytes(b"\"str\"").unwrap_err(),
        CardError::NotAnObject
    );
    assert_eq!(
        import_err(b"{\"description\":\"no name\"}"),
        CardError::MissingName
    );
    assert_eq!(import_err(b"{\"name\":\"   \"}"), CardError::MissingName);
    let v2_no_name = json!({"spec":"chara_card_v2","data":{"description":"x"}});
    assert_eq!(
        import_err(v2_no_name.to_string().as_bytes()),
        CardError::MissingName
    );
    let long = json!({"name": "é".repeat(129)});
    assert_eq!(
        import_err(long.to_string().as_bytes()),
        CardError::NameTooLong(129)
    );
    let ok = json!({"name": format!("  {}  ", "é".repeat(128))});
    assert!(cards::import_card(ok.to_string().as_bytes(), &CardLimits::default()).is_ok());
    assert!(matches!(
        import_err(b"{\"name\": "),
        CardError::InvalidJson(_)
    ));
    assert_eq!(import_err(b"{\"name\":\"\xFF\"}"), CardError::InvalidUtf8);
    let v4 = json!({"spec":"chara_card_v3","spec_version":"4.0","data":{"name":"x"}});
    assert!(matches!(
        import_err(v4.to_string().as_bytes()),
        CardError::UnsupportedSpecVersion(_)
    ));
    let v35 = json!({"spec":"chara_card_v3","spec_version":3.5,"data":{"name":"x"}});
    assert_eq!(import(v35.to_string().as_bytes()).spec, CardSpec::V3);
    let book = json!({"spec":"lorebook_v3","data":{"entries":[]}});
    assert!(matches!(
        import_err(book.to_string().as_bytes()),
        CardError::UnsupportedSpec(_)
    ));
}

#[test]
fn oversized_uploads_are_too_large() {
    let limits = CardLimits {
        max_input_bytes: 1000,
        ..CardLimits::default()
    };
    let err = cards::import_card(&vec![b' '; 1001], &limits).unwrap_err();
    assert_eq!(
        err,
        CardError::TooLarge {
            size: 1001,
            limit: 1000
        }
    );
    assert!(err.is_too_large());
}

// ---------------------------------------------------------------- CharX

fn zip_of(files: &[(&str, &[u8], zip::CompressionMethod)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes, method) in files {
        let options = zip::write::SimpleFileOptions::default().compression_method(*method);
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

const DEFLATE: zip::CompressionMethod = zip::CompressionMethod::Deflated;

#[test]
fn charx_from_another_tool_reads_card_json_and_the_misspelled_icon_uri() {
    for scheme in ["embeded://", "embedded://"] {
        let card = json!({"spec":"chara_card_v3","spec_version":"3.0","data":{"name":"Zipped",
            "assets":[{"type":"icon","uri":format!("{scheme}assets/icon/images/face.webp"),"name":"main","ext":"webp"},
                      {"type":"emotion","uri":"embeded://assets/emotion/images/happy.png","name":"happy","ext":"png"}]}});
        let webp = b"RIFF\x10\0\0\0WEBPVP8 fake";
        let bytes = zip_of(&[
            ("card.json", card.to_string().as_bytes(), DEFLATE),
            (
                "assets/icon/images/face.webp",
                webp,
                zip::CompressionMethod::Stored,
            ),
        ]);
        let imported = import(&bytes);
        assert_eq!(imported.format, CardFormat::Charx);
        assert_eq!(imported.character.name, "Zipped");
        let avatar = imported.avatar.as_ref().unwrap();
        assert_eq!(
            (avatar.content_type, avatar.ext.as_str()),
            ("image/webp", "webp")
        );
        assert_eq!(avatar.bytes, webp);
        // Not our canonical icon entry, so both assets stay.
        assert_eq!(
            imported
                .character
                .personality
                .assets
                .as_ref()
                .unwrap()
                .len(),
            2
        );
        assert_round_trips(&imported);
    }
}

#[test]
fn charx_without_card_json_is_rejected() {
    let bytes = zip_of(&[("nested/card.json", b"{}", DEFLATE)]);
    assert_eq!(import_err(&bytes), CardError::MissingCardJson);
}

#[test]
fn charx_with_a_parent_dir_or_absolute_entry_is_rejected() {
    for name in [
        "../evil",
        "assets/../../evil",
        "/etc/passwd",
        "C:/evil",
        "..\\evil",
    ] {
        let bytes = zip_of(&[
            ("card.json", b"{\"name\":\"x\"}", DEFLATE),
            (name, b"x", DEFLATE),
        ]);
        assert_eq!(
            import_err(&bytes),
            CardError::UnsafeZipPath(name.into()),
            "{name}"
        );
    }
}

#[test]
fn charx_zip_bombs_are_rejected_before_inflating() {
    let zeros = vec![0u8; 10 * 1024 * 1024];
    let bomb = zip_of(&[
        ("card.json", b"{\"name\":\"x\"}", DEFLATE),
        ("assets/big.bin", &zeros, DEFLATE),
    ]);
    let err = import_err(&bomb);
    assert!(
        matches!(err, CardError::ZipBombRatio { ref name, ratio, limit: 100 } if name == "assets/big.bin" && ratio > 100)
    );
    assert!(err.is_too_large());

    // Declared total over the limit (incompressible-ish data, so the ratio check passes).
    let noise: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big = zip_of(&[
        ("card.json", b"{\"name\":\"x\"}", DEFLATE),
        ("a.bin", &noise, DEFLATE),
    ]);
    let limits = CardLimits {
        max_uncompressed_bytes: 200_000,
        ..CardLimits::default()
    };
    let err = cards::import_card(&big, &limits).unwrap_err();
    assert!(
        matches!(err, CardError::ZipBombSize { limit: 200_000, .. }),
        "{err}"
    );
    assert!(err.is_too_large());
}

#[test]
fn charx_reading_enforces_the_limit_even_when_headers_lie() {
    let card = json!({"name": "Liar", "description": "x".repeat(5000)}).to_string();
    let mut bytes = zip_of(&[("card.json", card.as_bytes(), zip::CompressionMethod::Stored)]);
    // Patch the declared uncompressed size (local header offset 22, central directory +24) to 10.
    let cd = bytes.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    bytes[22..26].copy_from_slice(&10u32.to_le_bytes());
    bytes[cd + 24..cd + 28].copy_from_slice(&10u32.to_le_bytes());
    let limits = CardLimits {
        max_uncompressed_bytes: 1000,
        ..CardLimits::default()
    };
    // The zip crate notices the mismatch itself ("larger than its declared uncompressed size");
    // the budget-capped read in cards::charx is the second line of defence. Never a 5 KB read.
    match cards::import_card(&bytes, &limits) {
        Err(CardError::ZipBombSize { .. }) | Err(CardError::InvalidZip(_)) => {}
        other => panic!("expected a size or zip error, got {other:?}"),
    }
}

#[test]
fn garbage_after_zip_magic_is_an_invalid_zip() {
    assert!(matches!(
        import_err(b"PK\x03\x04garbage"),
        CardError::InvalidZip(_)
    ));
}

// ---------------------------------------------------------------- lorebooks

#[test]
fn world_info_file_maps_to_the_same_entries_as_the_card_book() {
    let wi: Value = serde_json::from_str(ELDORIA).unwrap();
    let book = cards::parse_lorebook(&wi).unwrap();
    let card_book = import(SERAPHINA)
        .character
        .personality
        .character_book
        .unwrap();
    assert_eq!(book.entries.len(), 4);
    for (a, b) in book.entries.iter().zip(&card_book.entries) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.keys, b.keys);
        assert_eq!(a.secondary_keys, b.secondary_keys);
        assert_eq!(a.content, b.content);
        assert_eq!(a.insertion_order, b.insertion_order);
        assert_eq!(a.enabled, b.enabled);
        assert_eq!(a.position, b.position);
        assert_eq!(a.constant, b.constant);
        assert_eq!(a.extensions["position"], b.extensions["position"]);
    }
    // World Info → book → World Info is exact.
    assert_eq!(cards::lorebook_to_worldinfo(&book), wi);
}

#[test]
fn world_info_sillytavern_fields_go_to_extensions_with_card_names() {
    let wi = json!({"entries": {
        "10": {"uid": 10, "key": ["a"], "keysecondary": ["b"], "content": "ten", "order": 5,
               "position": 4, "disable": true, "depth": 2, "role": 1, "selectiveLogic": 3,
               "groupOverride": true, "groupWeight": 50, "excludeRecursion": true,
               "preventRecursion": false, "delayUntilRecursion": true, "scanDepth": 7,
               "caseSensitive": true, "matchWholeWords": false, "sticky": 2, "cooldown": 1,
               "delay": 3, "displayIndex": 9, "someNewStField": "kept"},
        "2": {"uid": 2, "key": "x, y", "content": "two", "position": 1}
    }});
    let book = cards::parse_lorebook(&wi).unwrap();
    assert_eq!(book.entries[0].id, Some(json!(2)), "sorted by numeric uid");
    assert_eq!(book.entries[0].keys, ["x", "y"]);
    assert_eq!(book.entries[0].position.as_deref(), Some("after_char"));
    let e = &book.entries[1];
    assert!(!e.enabled);
    assert_eq!(e.insertion_order, 5);
    assert_eq!(e.secondary_keys.as_deref(), Some(&["b".to_owned()][..]));
    assert_eq!(e.position.as_deref(), Some("after_char"));
    for (k, v) in [
        ("position", json!(4)),
        ("depth", json!(2)),
        ("role", json!(1)),
        ("selectiveLogic", json!(3)),
        ("group_override", json!(true)),
        ("group_weight", json!(50)),
        ("exclude_recursion", json!(true)),
        ("prevent_recursion", json!(false)),
        ("delay_until_recursion", json!(true)),
        ("scan_depth", json!(7)),
        ("case_sensitive", json!(true)),
        ("match_whole_words", json!(false)),
        ("sticky", json!(2)),
        ("cooldown", json!(1)),
        ("delay", json!(3)),
        ("display_index", json!(9)),
        ("someNewStField", json!("kept")),
    ] {
        assert_eq!(e.extensions.get(k), Some(&v), "{k}");
    }
    let back = cards::lorebook_to_worldinfo(&book);
    assert_eq!(back["entries"]["10"]["groupOverride"], json!(true));
    assert_eq!(back["entries"]["10"]["position"], json!(4));
    assert_eq!(back["entries"]["10"]["disable"], json!(true));
    assert_eq!(
        cards::lorebook_to_worldinfo(&cards::parse_lorebook(&back).unwrap()),
        back
    );
}

#[test]
fn card_book_to_world_info_and_back_keeps_card_only_fields() {
    let book = import(generated_v3().to_string().as_bytes())
        .character
        .personality
        .character_book
        .unwrap();
    let wi = cards::lorebook_to_worldinfo(&book);
    // "e1" is not numeric, so it gets a free uid; 7 keeps its own.
    assert!(wi["entries"].get("7").is_some());
    let back = cards::parse_lorebook(&wi).unwrap();
    // World Info has no "unset", so absent optional fields come back as SillyTavern's defaults;
    // everything the card did set survives, including the card-only fields.
    for (a, b) in back.entries.iter().zip(&book.entries) {
        assert_eq!((&a.id, &a.keys, &a.content), (&b.id, &b.keys, &b.content));
        assert_eq!(
            (&a.name, a.priority, a.use_regex),
            (&b.name, b.priority, b.use_regex)
        );
        assert_eq!((a.case_sensitive, &a.extra), (b.case_sensitive, &b.extra));
        assert_eq!(
            (a.enabled, a.insertion_order),
            (b.enabled, b.insertion_order)
        );
        for (k, v) in &b.extensions {
            assert_eq!(a.extensions.get(k), Some(v));
        }
    }
    assert_eq!(back.entries[0].position.as_deref(), Some("after_char"));
    assert_eq!(
        (&back.name, back.scan_depth, &back.extensions),
        (&book.name, book.scan_depth, &book.extensions)
    );
    assert_eq!(
        cards::lorebook_to_worldinfo(&back),
        wi,
        "world info is a fixed point"
    );
}

#[test]
fn lorebook_v3_and_card_book_shapes_parse() {
    let entries = json!([{"id": 1, "keys": ["k"], "content": "c", "extensions": {}, "enabled": true, "insertion_order": 1}]);
    let v3 = json!({"spec": "lorebook_v3", "data": {"name": "L", "entries": entries}});
    let book = cards::parse_lorebook(&v3).unwrap();
    assert_eq!(book.name.as_deref(), Some("L"));
    assert_eq!(
        cards::parse_lorebook(&json!({"entries": entries}))
            .unwrap()
            .entries,
        book.entries
    );
    assert!(matches!(
        cards::parse_lorebook(&json!([1])),
        Err(CardError::InvalidLorebook(_))
    ));
    assert!(matches!(
        cards::parse_lorebook(&json!({"x": 1})),
        Err(CardError::InvalidLorebook(_))
    ));
}

#[test]
fn merging_lorebooks_replaces_by_id_and_appends_new_entries() {
    let entry = |id: Value, content: &str| LorebookEntry {
        id: Some(id),
        content: content.into(),
        ..LorebookEntry::default()
    };
    let existing = CharacterBook {
        name: Some("old".into()),
        scan_depth: Some(2),
        entries: vec![
            entry(json!(0), "a"),
            entry(json!(1), "b"),
            entry(json!("s"), "c"),
        ],
        ..CharacterBook::default()
    };
    let incoming = CharacterBook {
        name: Some("new".into()),
        entries: vec![
            entry(json!("1"), "B!"),
            entry(json!(5), "e"),
            LorebookEntry::default(),
        ],
        ..CharacterBook::default()
    };
    let merged = cards::merge_lorebooks(existing, incoming);
    assert_eq!(merged.name.as_deref(), Some("new"));
    assert_eq!(merged.scan_depth, Some(2));
    let contents: Vec<&str> = merged.entries.iter().map(|e| e.content.as_str()).collect();
    assert_eq!(contents, ["a", "B!", "c", "e", ""]);
}

// ---------------------------------------------------------------- NextChat

#[test]
fn nextchat_mask_talks_to_the_character_model() {
    let mut c = character(&import(SERAPHINA));
    c.first_mes = "Hi {{user}}, I am {{char}}.".into();
    let mask = cards::export_nextchat_mask(&c, "seraphina", None);
    assert_eq!(mask["name"], "Seraphina");
    assert_eq!(mask["avatar"], "1f600");
    assert_eq!(mask["modelConfig"]["model"], "char-seraphina");
    assert_eq!(mask["modelConfig"]["providerName"], "OpenAI");
    assert_eq!(mask["context"][0]["role"], "assistant");
    assert_eq!(mask["context"][0]["content"], "Hi User, I am Seraphina.");
    assert_eq!(mask["context"][0]["date"], "");
    assert_eq!(mask["syncGlobalConfig"], false);
    assert_eq!(mask["hideContext"], true);
    assert_eq!(mask["builtin"], false);
    assert_eq!(mask["lang"], "en");
    assert_eq!(mask["plugin"], json!([]));
    assert_eq!(mask["createdAt"], json!(1_795_687_200_000i64));
    let with_url = cards::export_nextchat_mask(&c, "s", Some("https://x/avatar.png"));
    assert_eq!(with_url["avatar"], "https://x/avatar.png");
}

#[test]
fn error_messages_are_lowercase_without_a_trailing_dot_and_sizes_map_to_413() {
    let errors = [
        CardError::Empty,
        CardError::UnknownFormat,
        CardError::NotPng,
        CardError::FirstChunkNotIhdr("IDAT".into()),
        CardError::Truncated(8),
        CardError::ChunkPastEnd {
            chunk: "IDAT".into(),
            length: 9,
        },
        CardError::BadCrc("IDAT".into()),
        CardError::MissingIend,
        CardError::NoCharacterData,
        CardError::InvalidBase64 {
            chunk: "chara".into(),
            reason: "x".into(),
        },
        CardError::InvalidUtf8,
        CardError::InvalidJson("x".into()),
        CardError::NotAnObject,
        CardError::UnsupportedSpec("x".into()),
        CardError::UnsupportedSpecVersion("4".into()),
        CardError::MissingName,
        CardError::NameTooLong(200),
        CardError::MissingCardJson,
        CardError::InvalidZip("x".into()),
        CardError::ZipBombSize { size: 2, limit: 1 },
        CardError::ZipBombRatio {
            name: "a".into(),
            ratio: 200,
            limit: 100,
        },
        CardError::UnsafeZipPath("../a".into()),
        CardError::TooLarge { size: 2, limit: 1 },
        CardError::InvalidLorebook("x".into()),
        CardError::Write("x".into()),
    ];
    for e in &errors {
        let msg = e.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
        let size = matches!(
            e,
            CardError::TooLarge { .. }
                | CardError::ZipBombSize { .. }
                | CardError::ZipBombRatio { .. }
        );
        assert_eq!(e.is_too_large(), size, "{msg}");
    }
}
