//! `Character` → card JSON (V2 and V3), PNG cards and NextChat masks.
//!
//! The `data` object is identical in the V2 and V3 output (only `spec`/`spec_version` differ),
//! as SillyTavern writes it, so a V2-only reader sees every V2 field and nothing is lost when the
//! V2 copy is the one re-imported. The top level repeats the V1 fields, as SillyTavern does.

use serde_json::{json, Map, Value};

use super::parse::{EXTRA_CARD_DATA, EXTRA_CARD_TOP_LEVEL, V1_MIRROR};
use super::{png, CardError};
use crate::model::Character;

/// The card `data` object for `c` (shared by V2 and V3).
pub fn card_data(c: &Character) -> Map<String, Value> {
    let p = &c.personality;
    let text = |v: &Option<String>| Value::String(v.clone().unwrap_or_default());
    let list = |v: &Option<Vec<String>>| json!(v.clone().unwrap_or_default());
    let mut data = Map::new();
    data.insert("name".into(), json!(c.name));
    data.insert("description".into(), json!(c.description));
    data.insert("personality".into(), json!(p.personality));
    data.insert("scenario".into(), json!(c.scenario));
    data.insert("first_mes".into(), json!(c.first_mes));
    data.insert("mes_example".into(), json!(c.mes_example));
    data.insert("creator_notes".into(), text(&p.creator_notes));
    data.insert("system_prompt".into(), text(&p.system_prompt));
    data.insert(
        "post_history_instructions".into(),
        text(&p.post_history_instructions),
    );
    data.insert("alternate_greetings".into(), list(&p.alternate_greetings));
    data.insert("tags".into(), json!(c.tags));
    data.insert("creator".into(), text(&p.creator));
    data.insert("character_version".into(), text(&p.character_version));
    data.insert("extensions".into(), Value::Object(p.extensions.clone()));
    if let Some(book) = &p.character_book {
        // CharacterBook is plain data with string keys; serializing it cannot fail.
        if let Ok(book) = serde_json::to_value(book) {
            data.insert("character_book".into(), book);
        }
    }
    data.insert("group_only_greetings".into(), list(&p.group_only_greetings));
    if let Some(v) = &p.nickname {
        data.insert("nickname".into(), json!(v));
    }
    if let Some(v) = &p.creator_notes_multilingual {
        data.insert(
            "creator_notes_multilingual".into(),
            Value::Object(v.clone()),
        );
    }
    if let Some(v) = &p.source {
        data.insert("source".into(), json!(v));
    }
    if let Some(v) = p.creation_date {
        data.insert("creation_date".into(), json!(v));
    }
    if let Some(v) = p.modification_date {
        data.insert("modification_date".into(), json!(v));
    }
    if let Some(v) = &p.assets {
        data.insert("assets".into(), Value::Array(v.clone()));
    }
    // Unknown or wrongly typed `data` keys from the imported card go back verbatim.
    if let Some(Value::Object(rest)) = p.extra.get(EXTRA_CARD_DATA) {
        for (k, v) in rest {
            data.insert(k.clone(), v.clone());
        }
    }
    data
}

/// A full card object: the V1 mirror and extras at the top level, then `spec` and `data`.
fn card_json(c: &Character, spec: &str, spec_version: &str, data: Map<String, Value>) -> Value {
    let p = &c.personality;
    let mut top = Map::new();
    for key in V1_MIRROR {
        if let Some(v) = data.get(key) {
            top.insert(key.to_owned(), v.clone());
        }
    }
    for (key, v) in [
        ("creatorcomment", &p.creatorcomment),
        ("avatar", &p.avatar),
        ("chat", &p.chat),
    ] {
        if let Some(v) = v {
            top.insert(key.to_owned(), json!(v));
        }
    }
    if let Some(Value::Object(rest)) = p.extra.get(EXTRA_CARD_TOP_LEVEL) {
        for (k, v) in rest {
            if !matches!(k.as_str(), "spec" | "spec_version" | "data") {
                top.insert(k.clone(), v.clone());
            }
        }
    }
    top.insert("spec".into(), json!(spec));
    top.insert("spec_version".into(), json!(spec_version));
    top.insert("data".into(), Value::Object(data));
    Value::Object(top)
}

/// `c` as a `chara_card_v2` JSON card (with SillyTavern's V1 mirror at the top level).
pub fn to_v2_json(c: &Character) -> Value {
    card_json(c, "chara_card_v2", "2.0", card_data(c))
}

/// `c` as a `chara_card_v3` JSON card (with SillyTavern's V1 mirror at the top level).
pub fn to_v3_json(c: &Character) -> Value {
    card_json(c, "chara_card_v3", "3.0", card_data(c))
}

/// `c` as a PNG card: `avatar_png` (or the built-in avatar when it is absent or not a valid PNG)
/// with `tEXt chara` (V2) and `tEXt ccv3` (V3) right before IEND.
pub fn export_png(c: &Character, avatar_png: Option<&[u8]>) -> Result<Vec<u8>, CardError> {
    let data = card_data(c);
    let v2 = card_json(c, "chara_card_v2", "2.0", data.clone()).to_string();
    let v3 = card_json(c, "chara_card_v3", "3.0", data).to_string();
    let image = avatar_png
        .filter(|bytes| png::parse(bytes).is_ok())
        .unwrap_or(png::DEFAULT_AVATAR_PNG);
    png::write_card(image, &v2, &v3)
}

/// `c` as a NextChat mask (the JSON NextChat imports under "Masks"), talking to model
/// `char-<slug>`. `avatar` is an image URL or a NextChat emoji code; `None` uses `1f600`.
/// `createdAt` comes from `c.created_at` (no clock is read here).
pub fn export_nextchat_mask(c: &Character, slug: &str, avatar: Option<&str>) -> Value {
    let char_name = c
        .personality
        .nickname
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(&c.name);
    let created_at = chrono::DateTime::parse_from_rfc3339(&c.created_at)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0);
    let context: Vec<Value> = if c.first_mes.is_empty() {
        Vec::new()
    } else {
        // NextChat shows mask context verbatim, so the common macros are resolved here.
        let greeting = c
            .first_mes
            .replace("{{char}}", char_name)
            .replace("{{user}}", "User");
        vec![json!({
            "id": format!("{}-greeting", c.id),
            "role": "assistant",
            "content": greeting,
            "date": "",
        })]
    };
    json!({
        "id": c.id,
        "avatar": avatar.unwrap_or("1f600"),
        "name": c.name,
        "context": context,
        "syncGlobalConfig": false,
        "modelConfig": {
            "model": format!("char-{slug}"),
            "providerName": "OpenAI",
            "temperature": 0.8,
            "top_p": 1,
            "max_tokens": 4000,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "sendMemory": true,
            "historyMessageCount": 4,
            "compressMessageLengthThreshold": 1000,
            "compressModel": "",
            "compressProviderName": "",
            // Taproom builds the whole prompt from the card; NextChat's own system prompt would
            // only compete with it.
            "enableInjectSystemPrompts": false,
            "template": "{{input}}",
        },
        "lang": "en",
        "builtin": false,
        "createdAt": created_at,
        "hideContext": true,
        "plugin": [],
    })
}
