//! Lorebooks: the card `character_book`, the standalone `lorebook_v3` and SillyTavern's World Info
//! file, converted to and from the domain [`CharacterBook`], plus merging.
//!
//! SillyTavern's World Info fields without a card column go into each entry's `extensions` under
//! the snake_case names SillyTavern itself uses when it embeds a World Info book into a card
//! (`groupOverride` ↔ `group_override`, …); unknown World Info keys are kept there verbatim.
//! Card-only fields with no World Info column (`name`, `priority`, `use_regex`, top-level
//! `case_sensitive`, a string `id`, unknown keys) ride in a `cardEntry` object of the World Info
//! entry, so book → World Info → book keeps them.

use serde_json::{json, Map, Value};

use super::CardError;
use crate::model::{CharacterBook, LorebookEntry};

/// World Info key ↔ card `extensions` key, for SillyTavern fields with no card column.
const WI_TO_EXTENSION: &[(&str, &str)] = &[
    ("depth", "depth"),
    ("role", "role"),
    ("selectiveLogic", "selectiveLogic"),
    ("probability", "probability"),
    ("useProbability", "useProbability"),
    ("group", "group"),
    ("groupOverride", "group_override"),
    ("groupWeight", "group_weight"),
    ("scanDepth", "scan_depth"),
    ("caseSensitive", "case_sensitive"),
    ("matchWholeWords", "match_whole_words"),
    ("excludeRecursion", "exclude_recursion"),
    ("preventRecursion", "prevent_recursion"),
    ("delayUntilRecursion", "delay_until_recursion"),
    ("sticky", "sticky"),
    ("cooldown", "cooldown"),
    ("delay", "delay"),
    ("displayIndex", "display_index"),
    ("useGroupScoring", "use_group_scoring"),
    ("automationId", "automation_id"),
    ("vectorized", "vectorized"),
];

/// World Info key carrying card-only entry fields (see the module doc).
const CARD_ENTRY_KEY: &str = "cardEntry";

/// Reads any accepted lorebook shape: a SillyTavern World Info file (`entries` keyed by uid), a
/// card `character_book` (`entries` array), `{spec:"lorebook_v3", data}`, or a whole card with
/// `data.character_book`.
pub fn parse_lorebook(value: &Value) -> Result<CharacterBook, CardError> {
    let Value::Object(obj) = value else {
        return Err(CardError::InvalidLorebook(
            "expected a json object".to_owned(),
        ));
    };
    if obj.get("spec").and_then(Value::as_str) == Some("lorebook_v3") {
        let data = obj.get("data").ok_or_else(|| {
            CardError::InvalidLorebook("lorebook_v3 without a data object".to_owned())
        })?;
        return book_from_card_value(data.clone());
    }
    match obj.get("entries") {
        Some(Value::Object(_)) => return world_info_to_book(obj),
        Some(Value::Array(_)) => return book_from_card_value(value.clone()),
        _ => {}
    }
    if let Some(book) = obj.get("data").and_then(|d| d.get("character_book")) {
        return book_from_card_value(book.clone());
    }
    Err(CardError::InvalidLorebook(
        "expected a world info file ({\"entries\":{...}}), a character_book or a lorebook_v3 object"
            .to_owned(),
    ))
}

/// Reads a card-shaped `character_book` value.
pub fn book_from_card_value(value: Value) -> Result<CharacterBook, CardError> {
    serde_json::from_value(value).map_err(|e| CardError::InvalidLorebook(e.to_string()))
}

fn string_list(value: Option<Value>) -> Option<Vec<String>> {
    match value? {
        Value::Array(items) => Some(
            items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
        ),
        Value::String(s) => Some(super::parse::split_tags(&s)),
        _ => None,
    }
}

fn uid_of(key: &str, entry: &Map<String, Value>) -> Option<i64> {
    entry
        .get("uid")
        .and_then(Value::as_i64)
        .or_else(|| key.parse().ok())
}

fn world_info_to_book(obj: &Map<String, Value>) -> Result<CharacterBook, CardError> {
    let mut book = CharacterBook::default();
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("entries", _) => {}
            ("name", Value::String(s)) => book.name = Some(s.clone()),
            ("description", Value::String(s)) => book.description = Some(s.clone()),
            ("scan_depth", Value::Number(n)) if n.as_u64().is_some() => {
                book.scan_depth = n.as_u64().and_then(|v| u32::try_from(v).ok())
            }
            ("token_budget", Value::Number(n)) if n.as_u64().is_some() => {
                book.token_budget = n.as_u64().and_then(|v| u32::try_from(v).ok())
            }
            ("recursive_scanning", Value::Bool(b)) => book.recursive_scanning = Some(*b),
            ("extensions", Value::Object(m)) => book.extensions = m.clone(),
            _ => {
                book.extra.insert(key.clone(), value.clone());
            }
        }
    }
    let Some(Value::Object(entries)) = obj.get("entries") else {
        return Ok(book);
    };
    let mut sorted: Vec<(&String, &Value)> = entries.iter().collect();
    // Entries are keyed by uid as a string; order them numerically like SillyTavern's list.
    sorted.sort_by_key(|(k, v)| (v.as_object().and_then(|e| uid_of(k, e)), (*k).clone()));
    for (key, value) in sorted {
        let Value::Object(entry) = value else {
            return Err(CardError::InvalidLorebook(format!(
                "world info entry {key} is not an object"
            )));
        };
        book.entries.push(world_info_entry(key, entry.clone()));
    }
    Ok(book)
}

fn world_info_entry(key: &str, mut wi: Map<String, Value>) -> LorebookEntry {
    let mut e = LorebookEntry {
        id: wi
            .remove("uid")
            .or_else(|| key.parse::<i64>().ok().map(Value::from))
            .or_else(|| Some(Value::String(key.to_owned()))),
        keys: string_list(wi.remove("key")).unwrap_or_default(),
        secondary_keys: string_list(wi.remove("keysecondary")),
        comment: wi
            .remove("comment")
            .and_then(|v| v.as_str().map(str::to_owned)),
        content: wi
            .remove("content")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        constant: wi.remove("constant").and_then(|v| v.as_bool()),
        selective: wi.remove("selective").and_then(|v| v.as_bool()),
        ..LorebookEntry::default()
    };
    if let Some(order) = wi.remove("order").and_then(|v| v.as_f64()) {
        e.insertion_order = order as i64;
    }
    if let Some(disable) = wi.remove("disable").and_then(|v| v.as_bool()) {
        e.enabled = !disable;
    }
    if let Some(position) = wi.remove("position") {
        // The card shape only knows before/after the character; the exact slot stays in
        // extensions.position as SillyTavern does.
        let before = position.as_i64() == Some(0);
        e.position = Some(if before { "before_char" } else { "after_char" }.to_owned());
        e.extensions.insert("position".to_owned(), position);
    }
    if let Some(Value::Object(card)) = wi.remove(CARD_ENTRY_KEY) {
        restore_card_fields(&mut e, card);
    }
    for (k, v) in wi {
        let ext_key = WI_TO_EXTENSION
            .iter()
            .find(|(wi_key, _)| *wi_key == k)
            .map_or(k.as_str(), |(_, ext)| ext);
        e.extensions.insert(ext_key.to_owned(), v);
    }
    e
}

fn restore_card_fields(e: &mut LorebookEntry, card: Map<String, Value>) {
    for (k, v) in card {
        match k.as_str() {
            "name" => e.name = v.as_str().map(str::to_owned),
            "priority" => e.priority = v.as_i64(),
            "use_regex" => e.use_regex = v.as_bool(),
            "case_sensitive" => e.case_sensitive = v.as_bool(),
            "id" => e.id = Some(v),
            _ => {
                e.extra.insert(k, v);
            }
        }
    }
}

/// A card lorebook as a SillyTavern World Info file (`{"entries":{"<uid>":{...}}}`).
pub fn lorebook_to_worldinfo(book: &CharacterBook) -> Value {
    let mut out = Map::new();
    if let Some(v) = &book.name {
        out.insert("name".into(), json!(v));
    }
    if let Some(v) = &book.description {
        out.insert("description".into(), json!(v));
    }
    if let Some(v) = book.scan_depth {
        out.insert("scan_depth".into(), json!(v));
    }
    if let Some(v) = book.token_budget {
        out.insert("token_budget".into(), json!(v));
    }
    if let Some(v) = book.recursive_scanning {
        out.insert("recursive_scanning".into(), json!(v));
    }
    if !book.extensions.is_empty() {
        out.insert("extensions".into(), Value::Object(book.extensions.clone()));
    }
    for (k, v) in &book.extra {
        out.insert(k.clone(), v.clone());
    }

    let mut entries = Map::new();
    let mut used = std::collections::BTreeSet::new();
    let mut next_free: i64 = 0;
    for e in &book.entries {
        let numeric =
            e.id.as_ref()
                .and_then(Value::as_i64)
                .filter(|id| used.insert(*id));
        let uid = numeric.unwrap_or_else(|| {
            while used.contains(&next_free) {
                next_free += 1;
            }
            used.insert(next_free);
            next_free
        });
        let mut wi = world_info_entry_of(e, uid);
        if numeric.is_none() {
            if let Some(id) = &e.id {
                insert_card_field(&mut wi, "id", id.clone());
            }
        }
        entries.insert(uid.to_string(), Value::Object(wi));
    }
    out.insert("entries".into(), Value::Object(entries));
    Value::Object(out)
}

fn insert_card_field(wi: &mut Map<String, Value>, key: &str, value: Value) {
    if let Some(Value::Object(card)) = wi.get_mut(CARD_ENTRY_KEY) {
        card.insert(key.to_owned(), value);
    } else {
        let mut card = Map::new();
        card.insert(key.to_owned(), value);
        wi.insert(CARD_ENTRY_KEY.to_owned(), Value::Object(card));
    }
}

fn world_info_entry_of(e: &LorebookEntry, uid: i64) -> Map<String, Value> {
    let mut wi = Map::new();
    wi.insert("uid".into(), json!(uid));
    wi.insert("key".into(), json!(e.keys));
    wi.insert(
        "keysecondary".into(),
        json!(e.secondary_keys.clone().unwrap_or_default()),
    );
    wi.insert(
        "comment".into(),
        json!(e.comment.clone().unwrap_or_default()),
    );
    wi.insert("content".into(), json!(e.content));
    wi.insert("constant".into(), json!(e.constant.unwrap_or(false)));
    wi.insert("selective".into(), json!(e.selective.unwrap_or(false)));
    wi.insert("order".into(), json!(e.insertion_order));
    let position = e.extensions.get("position").cloned().unwrap_or_else(|| {
        json!(if e.position.as_deref() == Some("after_char") {
            1
        } else {
            0
        })
    });
    wi.insert("position".into(), position);
    wi.insert("disable".into(), json!(!e.enabled));
    for (k, v) in &e.extensions {
        if k == "position" {
            continue;
        }
        let wi_key = WI_TO_EXTENSION
            .iter()
            .find(|(_, ext)| ext == k)
            .map_or(k.as_str(), |(wi_key, _)| wi_key);
        wi.insert(wi_key.to_owned(), v.clone());
    }
    let mut card = Map::new();
    if let Some(v) = &e.name {
        card.insert("name".into(), json!(v));
    }
    if let Some(v) = e.priority {
        card.insert("priority".into(), json!(v));
    }
    if let Some(v) = e.use_regex {
        card.insert("use_regex".into(), json!(v));
    }
    if let Some(v) = e.case_sensitive {
        card.insert("case_sensitive".into(), json!(v));
    }
    for (k, v) in &e.extra {
        card.insert(k.clone(), v.clone());
    }
    if !card.is_empty() {
        wi.insert(CARD_ENTRY_KEY.into(), Value::Object(card));
    }
    wi
}

/// Canonical text of an entry id, so `1` and `"1"` match when merging.
fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Merges `incoming` into `existing`: entries with the same id/uid are replaced by the incoming
/// one (in place), new entries are appended, and incoming book-level fields win when set.
pub fn merge_lorebooks(existing: CharacterBook, incoming: CharacterBook) -> CharacterBook {
    let mut merged = existing;
    merged.name = incoming.name.or(merged.name);
    merged.description = incoming.description.or(merged.description);
    merged.scan_depth = incoming.scan_depth.or(merged.scan_depth);
    merged.token_budget = incoming.token_budget.or(merged.token_budget);
    merged.recursive_scanning = incoming.recursive_scanning.or(merged.recursive_scanning);
    merged.extensions.extend(incoming.extensions);
    merged.extra.extend(incoming.extra);
    let mut positions: std::collections::HashMap<String, usize> = merged
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.id.as_ref().map(|id| (id_key(id), i)))
        .collect();
    for entry in incoming.entries {
        match entry.id.as_ref().map(id_key) {
            Some(key) => match positions.get(&key) {
                Some(&i) => merged.entries[i] = entry,
                None => {
                    positions.insert(key, merged.entries.len());
                    merged.entries.push(entry);
                }
            },
            None => merged.entries.push(entry),
        }
    }
    merged
}
