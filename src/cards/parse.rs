//! Card JSON → [`CardCharacter`]: detects the shape from the content (V1 flat, V2, V3,
//! SillyTavern's V2-with-V1-mirror, Pygmalion) and maps every field somewhere lossless.
//!
//! Where fields without a `Character` column go is documented in `docs/CARDS.md`; in short,
//! unknown keys inside `data` land in `PersonalityProfile.extra["cardData"]` and unknown top-level
//! keys (SillyTavern's V1 mirror extras such as `talkativeness`, `fav`, `create_date`) in
//! `PersonalityProfile.extra["cardTopLevel"]`, both verbatim, so export can put them back.

use serde_json::{Map, Value};

use super::{lorebook, CardCharacter, CardError, CardSpec, MAX_NAME_CHARS};
use crate::model::PersonalityProfile;

/// `PersonalityProfile.extra` key holding unknown keys of the card's `data` object.
pub const EXTRA_CARD_DATA: &str = "cardData";
/// `PersonalityProfile.extra` key holding top-level card keys outside `data` that have no field.
pub const EXTRA_CARD_TOP_LEVEL: &str = "cardTopLevel";

/// The six V1 fields SillyTavern mirrors at the top level of a V2/V3 card.
pub(crate) const V1_MIRROR: [&str; 6] = [
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
];

/// A card JSON mapped onto character fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCard {
    /// The character pieces.
    pub character: CardCharacter,
    /// Which card shape the JSON had.
    pub spec: CardSpec,
    /// Non-fatal oddities (e.g. a field of the wrong type kept verbatim).
    pub warnings: Vec<String>,
}

/// Parses card JSON bytes (UTF-8, optional BOM) into character fields.
pub fn parse_card_bytes(bytes: &[u8]) -> Result<ParsedCard, CardError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CardError::InvalidUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: Value =
        serde_json::from_str(text).map_err(|e| CardError::InvalidJson(e.to_string()))?;
    parse_card_value(value)
}

/// Maps an already parsed card JSON value into character fields.
pub fn parse_card_value(value: Value) -> Result<ParsedCard, CardError> {
    let Value::Object(top) = value else {
        return Err(CardError::NotAnObject);
    };
    let mut warnings = Vec::new();
    let spec = top.get("spec").map(|s| s.as_str().map(str::to_owned));
    match spec {
        Some(Some(s)) if s == "chara_card_v3" => {
            check_v3_version(top.get("spec_version"), &mut warnings)?;
            wrapped(top, CardSpec::V3, warnings)
        }
        Some(Some(s)) if s == "chara_card_v2" => wrapped(top, CardSpec::V2, warnings),
        Some(Some(s)) => Err(CardError::UnsupportedSpec(s)),
        Some(None) => Err(CardError::UnsupportedSpec("(not a string)".to_owned())),
        None if top.contains_key("char_name") => {
            let character = pygmalion(top, &mut warnings)?;
            Ok(ParsedCard {
                character,
                spec: CardSpec::Pygmalion,
                warnings,
            })
        }
        None if !top.contains_key("name") && top.get("data").is_some_and(Value::is_object) => {
            warnings.push("card has a data object but no spec; read as chara_card_v2".to_owned());
            wrapped(top, CardSpec::V2, warnings)
        }
        None => {
            let character = flat_v1(top, &mut warnings)?;
            Ok(ParsedCard {
                character,
                spec: CardSpec::V1,
                warnings,
            })
        }
    }
}

/// V3 readers must accept 3.0 ≤ spec_version < 4.0, compared as a number.
fn check_v3_version(version: Option<&Value>, warnings: &mut Vec<String>) -> Result<(), CardError> {
    let number = match version {
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(Value::Number(n)) => n.as_f64(),
        _ => None,
    };
    match number {
        Some(v) if (3.0..4.0).contains(&v) => Ok(()),
        Some(_) => Err(CardError::UnsupportedSpecVersion(
            version.map(Value::to_string).unwrap_or_default(),
        )),
        None => {
            warnings.push("chara_card_v3 without a numeric spec_version; read as 3.0".to_owned());
            Ok(())
        }
    }
}

/// Takes typed fields out of a JSON object; values of the wrong type are moved verbatim into
/// `rest` (and a warning is recorded) so nothing is lost.
struct Fields<'w> {
    map: Map<String, Value>,
    rest: Map<String, Value>,
    warnings: &'w mut Vec<String>,
}

impl<'w> Fields<'w> {
    fn new(map: Map<String, Value>, warnings: &'w mut Vec<String>) -> Self {
        Self {
            map,
            rest: Map::new(),
            warnings,
        }
    }

    fn wrong_type(&mut self, key: &str, value: Value, expected: &str) {
        self.warnings
            .push(format!("field {key} is not {expected}; kept verbatim"));
        self.rest.insert(key.to_owned(), value);
    }

    /// A string field; `null` counts as absent.
    fn string(&mut self, key: &str) -> Option<String> {
        match self.map.remove(key)? {
            Value::String(s) => Some(s),
            Value::Null => None,
            other => {
                self.wrong_type(key, other, "a string");
                None
            }
        }
    }

    /// A required-by-spec string whose empty value means "not set".
    fn non_empty(&mut self, key: &str) -> Option<String> {
        self.string(key).filter(|s| !s.is_empty())
    }

    /// An array of strings; a non-string element moves the whole value to `rest`.
    fn strings(&mut self, key: &str) -> Option<Vec<String>> {
        match self.map.remove(key)? {
            Value::Null => None,
            Value::Array(items) if items.iter().all(Value::is_string) => Some(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s),
                        _ => None,
                    })
                    .collect(),
            ),
            other => {
                self.wrong_type(key, other, "an array of strings");
                None
            }
        }
    }

    /// An array of strings whose empty value means "not set".
    fn non_empty_strings(&mut self, key: &str) -> Option<Vec<String>> {
        self.strings(key).filter(|v| !v.is_empty())
    }

    /// `tags`: an array of strings, or SillyTavern's comma-separated string.
    fn tags(&mut self, key: &str) -> Vec<String> {
        match self.map.get(key) {
            Some(Value::String(s)) => {
                let tags = split_tags(s);
                self.map.remove(key);
                tags
            }
            _ => self.strings(key).unwrap_or_default(),
        }
    }

    fn object(&mut self, key: &str) -> Option<Map<String, Value>> {
        match self.map.remove(key)? {
            Value::Object(m) => Some(m),
            Value::Null => None,
            other => {
                self.wrong_type(key, other, "an object");
                None
            }
        }
    }

    fn array(&mut self, key: &str) -> Option<Vec<Value>> {
        match self.map.remove(key)? {
            Value::Array(a) => Some(a),
            Value::Null => None,
            other => {
                self.wrong_type(key, other, "an array");
                None
            }
        }
    }

    fn integer(&mut self, key: &str) -> Option<i64> {
        match self.map.remove(key)? {
            Value::Number(n) if n.as_i64().is_some() => n.as_i64(),
            Value::Null => None,
            other => {
                self.wrong_type(key, other, "an integer");
                None
            }
        }
    }

    /// Everything not taken, plus the wrongly typed values.
    fn finish(mut self) -> Map<String, Value> {
        self.rest.append(&mut self.map);
        self.rest
    }
}

/// Splits SillyTavern's comma-separated tag string, dropping empty pieces.
pub(crate) fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn validate_name(name: Option<String>) -> Result<String, CardError> {
    let name = name.ok_or(CardError::MissingName)?;
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(CardError::MissingName);
    }
    let chars = trimmed.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(CardError::NameTooLong(chars));
    }
    Ok(name)
}

/// Builds the character from the six core fields; the profile repeats them because the spec's
/// PersonalityProfile carries them too.
fn core(
    name: String,
    description: String,
    personality: String,
    scenario: String,
    first_mes: String,
    mes_example: String,
    tags: Vec<String>,
) -> CardCharacter {
    CardCharacter {
        personality: PersonalityProfile {
            name: name.clone(),
            description: description.clone(),
            personality,
            scenario: scenario.clone(),
            first_mes: first_mes.clone(),
            mes_example: mes_example.clone(),
            ..PersonalityProfile::default()
        },
        name,
        description,
        scenario,
        first_mes,
        mes_example,
        tags,
    }
}

/// Moves `creatorcomment`, `avatar` and `chat` (SillyTavern's V1 extras with a profile field) out
/// of a top-level map into the profile, and the rest into `extra["cardTopLevel"]`.
fn keep_top_level(
    mut top: Map<String, Value>,
    profile: &mut PersonalityProfile,
    warnings: &mut Vec<String>,
) {
    for (key, slot) in [
        ("creatorcomment", &mut profile.creatorcomment),
        ("avatar", &mut profile.avatar),
        ("chat", &mut profile.chat),
    ] {
        if let Some(Value::String(_)) = top.get(key) {
            if let Some(Value::String(s)) = top.remove(key) {
                *slot = Some(s);
            }
        }
    }
    for reserved in ["spec", "spec_version", "data"] {
        if top.remove(reserved).is_some() {
            warnings.push(format!(
                "top-level {reserved} of an unexpected type was dropped"
            ));
        }
    }
    if !top.is_empty() {
        profile
            .extra
            .insert(EXTRA_CARD_TOP_LEVEL.to_owned(), Value::Object(top));
    }
}

/// V1 (TavernAI): a flat object; everything but the six fields is a V1 extra.
fn flat_v1(
    top: Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<CardCharacter, CardError> {
    let mut f = Fields::new(top, warnings);
    let name = validate_name(f.string("name"))?;
    let description = f.string("description").unwrap_or_default();
    let personality = f.string("personality").unwrap_or_default();
    let scenario = f.string("scenario").unwrap_or_default();
    let first_mes = f.string("first_mes").unwrap_or_default();
    let mes_example = f.string("mes_example").unwrap_or_default();
    let tags = f.tags("tags");
    let rest = f.finish();
    let mut c = core(
        name,
        description,
        personality,
        scenario,
        first_mes,
        mes_example,
        tags,
    );
    keep_top_level(rest, &mut c.personality, warnings);
    Ok(c)
}

/// Pygmalion: `char_name`, `char_persona`, `char_greeting`, `example_dialogue`, `world_scenario`.
fn pygmalion(
    top: Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<CardCharacter, CardError> {
    let mut f = Fields::new(top, warnings);
    let name = validate_name(f.string("char_name"))?;
    let description = f.string("char_persona").unwrap_or_default();
    let personality = f.string("personality").unwrap_or_default();
    let scenario = f.string("world_scenario").unwrap_or_default();
    let first_mes = f.string("char_greeting").unwrap_or_default();
    let mes_example = f.string("example_dialogue").unwrap_or_default();
    let rest = f.finish();
    let mut c = core(
        name,
        description,
        personality,
        scenario,
        first_mes,
        mes_example,
        Vec::new(),
    );
    keep_top_level(rest, &mut c.personality, warnings);
    Ok(c)
}

/// V2/V3: `{spec, spec_version, data}` plus, from SillyTavern, a V1 mirror at the top level.
fn wrapped(
    mut top: Map<String, Value>,
    spec: CardSpec,
    mut warnings: Vec<String>,
) -> Result<ParsedCard, CardError> {
    let data = match top.remove("data") {
        Some(Value::Object(data)) => data,
        other => {
            warnings.push(format!(
                "{} card without a data object; read as a v1 card",
                spec.as_str()
            ));
            if let Some(other) = other {
                top.insert("data".to_owned(), other);
            }
            top.remove("spec");
            top.remove("spec_version");
            let character = flat_v1(top, &mut warnings)?;
            return Ok(ParsedCard {
                character,
                spec,
                warnings,
            });
        }
    };
    top.remove("spec");
    top.remove("spec_version");
    // The mirror is redundant when it equals `data`; a differing mirror is kept verbatim.
    for key in V1_MIRROR {
        if top.get(key).is_some() && top.get(key) == data.get(key) {
            top.remove(key);
        }
    }

    let mut f = Fields::new(data, &mut warnings);
    let name = validate_name(f.string("name"))?;
    let description = f.string("description").unwrap_or_default();
    let personality = f.string("personality").unwrap_or_default();
    let scenario = f.string("scenario").unwrap_or_default();
    let first_mes = f.string("first_mes").unwrap_or_default();
    let mes_example = f.string("mes_example").unwrap_or_default();
    let tags = f.tags("tags");
    let mut c = core(
        name,
        description,
        personality,
        scenario,
        first_mes,
        mes_example,
        tags,
    );
    let p = &mut c.personality;
    // V2 requires these; an empty string or list is the spec's "not set".
    p.creator_notes = f.non_empty("creator_notes");
    p.system_prompt = f.non_empty("system_prompt");
    p.post_history_instructions = f.non_empty("post_history_instructions");
    p.creator = f.non_empty("creator");
    p.character_version = f.non_empty("character_version");
    p.alternate_greetings = f.non_empty_strings("alternate_greetings");
    p.extensions = f.object("extensions").unwrap_or_default();
    if let Some(book) = f.map.remove("character_book") {
        if !book.is_null() {
            match lorebook::book_from_card_value(book.clone()) {
                Ok(book) => p.character_book = Some(book),
                Err(e) => f.wrong_type("character_book", book, &format!("a valid lorebook ({e})")),
            }
        }
    }
    // V3 fields, read whatever the declared spec: SillyTavern writes the same data in both chunks.
    p.nickname = f.string("nickname");
    p.creator_notes_multilingual = f.object("creator_notes_multilingual");
    p.source = f.strings("source");
    p.group_only_greetings = f.non_empty_strings("group_only_greetings");
    p.creation_date = f.integer("creation_date");
    p.modification_date = f.integer("modification_date");
    p.assets = f.array("assets").filter(|a| !a.is_empty());
    let rest = f.finish();
    if !rest.is_empty() {
        p.extra
            .insert(EXTRA_CARD_DATA.to_owned(), Value::Object(rest));
    }
    keep_top_level(top, p, &mut warnings);
    Ok(ParsedCard {
        character: c,
        spec,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shape_is_detected_from_content() {
        let cases = [
            (json!({"name": "a"}), CardSpec::V1),
            (json!({"char_name": "a"}), CardSpec::Pygmalion),
            (
                json!({"spec": "chara_card_v2", "data": {"name": "a"}}),
                CardSpec::V2,
            ),
            (
                json!({"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "a"}}),
                CardSpec::V3,
            ),
            (
                json!({"spec": "chara_card_v3", "spec_version": 3.99, "data": {"name": "a"}}),
                CardSpec::V3,
            ),
            (json!({"data": {"name": "a"}}), CardSpec::V2),
        ];
        for (card, spec) in cases {
            assert_eq!(
                parse_card_value(card.clone()).map(|p| p.spec),
                Ok(spec),
                "{card}"
            );
        }
    }

    #[test]
    fn tag_strings_split_on_commas() {
        let cases: [(&str, &[&str]); 4] = [
            ("", &[]),
            ("a", &["a"]),
            (" a , b,,c ", &["a", "b", "c"]),
            ("multi word, x", &["multi word", "x"]),
        ];
        for (input, expected) in cases {
            assert_eq!(split_tags(input), expected, "{input:?}");
        }
    }
}
