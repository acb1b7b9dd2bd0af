//! Conversations as SillyTavern users know them: a greeting (with alternate greetings as
//! swipes), turns, swipes, edits and deletions, plus SillyTavern chat JSONL import and export.
//! A conversation belongs to the user who started it; nobody else can see it.

use crate::auth::User;
use crate::characters::{blocking, CharacterService};
use crate::error::{ApiError, ErrorCode};
use crate::model::{Character, Conversation, MessageRole, StoredMessage};
use crate::store::{self, ConversationPage, History, Store};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use uuid::Uuid;

/// Most messages accepted in one imported chat file.
pub const MAX_IMPORT_MESSAGES: usize = 100_000;

/// The conversation service.
#[derive(Clone)]
pub struct ConversationService {
    store: Store,
    characters: CharacterService,
}

/// Substitutes the two macros a stored greeting needs (`{{char}}`, `{{user}}` and the legacy
/// `<BOT>`/`<USER>`/`<CHAR>` forms); the prompt builder handles the full macro set.
pub fn greeting_macros(text: &str, char_name: &str, user_name: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(['{', '<']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let lower: String = tail.chars().take(8).collect::<String>().to_lowercase();
        let (replacement, len) = if lower.starts_with("{{char}}") {
            (Some(char_name), 8)
        } else if lower.starts_with("{{user}}") {
            (Some(user_name), 8)
        } else if lower.starts_with("<bot>") {
            (Some(char_name), 5)
        } else if lower.starts_with("<char>") {
            (Some(char_name), 6)
        } else if lower.starts_with("<user>") {
            (Some(user_name), 6)
        } else {
            (None, 1)
        };
        match replacement {
            Some(r) => out.push_str(r),
            None => out.push_str(&tail[..1]),
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The name `{{char}}` stands for: the V3 nickname when set.
pub fn char_display_name(c: &Character) -> &str {
    c.personality
        .nickname
        .as_deref()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(&c.name)
}

/// A new message at `seq`.
pub fn new_message(seq: u64, role: MessageRole, name: &str, content: String) -> StoredMessage {
    StoredMessage {
        id: Uuid::now_v7().to_string(),
        seq,
        role,
        name: name.to_string(),
        content,
        timestamp: crate::time::now_rfc3339(),
        swipes: Vec::new(),
        swipe_id: 0,
        swipe_info: Vec::new(),
        generated: false,
        model: None,
        usage: None,
        finish_reason: None,
        tokens: None,
        extra: Map::new(),
    }
}

impl ConversationService {
    /// A service over the store.
    pub fn new(store: Store, characters: CharacterService) -> Self {
        Self { store, characters }
    }

    /// The character service (for access checks).
    pub fn characters(&self) -> &CharacterService {
        &self.characters
    }

    /// A fresh conversation whose first message is the greeting (`greeting_index` 0 is
    /// `firstMes`, 1.. the alternate greetings, all kept as swipes). Not stored yet.
    pub fn start(
        &self,
        user: &User,
        character: &Character,
        user_name: &str,
        greeting_index: usize,
    ) -> Result<(Conversation, Vec<StoredMessage>), ApiError> {
        let char_name = char_display_name(character);
        let mut greetings = vec![character.first_mes.clone()];
        greetings.extend(
            character
                .personality
                .alternate_greetings
                .iter()
                .flatten()
                .cloned(),
        );
        if greeting_index >= greetings.len() {
            return Err(ApiError::validation(
                "parameters.greetingIndex",
                format!(
                    "this character has {} greeting(s); use 0..{}",
                    greetings.len(),
                    greetings.len() - 1
                ),
            ));
        }
        let now = crate::time::now_rfc3339();
        let conversation = Conversation {
            id: Uuid::now_v7().to_string(),
            character_id: character.id.clone(),
            user_id: user.id.clone(),
            started_at: now.clone(),
            last_activity: now,
            title: None,
            message_count: 0,
            next_seq: 0,
            user_name: user_name.to_string(),
            lore_state: Value::Null,
            character_state: None,
            seed: rand::random(),
            chat_metadata: Map::new(),
            plugin_state: Map::new(),
        };
        let mut messages = Vec::new();
        let has_greeting = greetings.iter().any(|g| !g.trim().is_empty());
        if has_greeting {
            let swipes: Vec<String> = greetings
                .iter()
                .map(|g| greeting_macros(g, char_name, user_name))
                .collect();
            let mut m = new_message(
                0,
                MessageRole::Character,
                char_name,
                swipes[greeting_index].clone(),
            );
            if swipes.len() > 1 {
                m.swipes = swipes;
                m.swipe_id = greeting_index;
            }
            messages.push(m);
        }
        Ok((conversation, messages))
    }

    /// A conversation of the caller's, with its history.
    pub fn load_owned(&self, cid: &str, user: &User) -> Result<Arc<History>, ApiError> {
        let key = store::parse_id(cid).ok_or_else(|| conversation_not_found(cid))?;
        let history = self
            .store
            .history(key)?
            .ok_or_else(|| conversation_not_found(cid))?;
        // Other users' conversations do not exist for the caller, not even for admins.
        if history.conversation.user_id != user.id {
            return Err(conversation_not_found(cid));
        }
        Ok(history)
    }

    /// Stores a conversation change.
    pub async fn save(
        &self,
        conversation: Conversation,
        previous: Option<Conversation>,
        upserts: Vec<StoredMessage>,
        removed: Vec<u64>,
        usage_delta: u64,
    ) -> Result<Arc<History>, ApiError> {
        Ok(self
            .store
            .save_conversation(store::ConversationChange {
                conversation,
                previous,
                upserts,
                removed,
                usage_delta,
            })
            .await?)
    }

    /// The caller's conversations with a character, newest activity first.
    pub async fn list(
        &self,
        user: &User,
        character_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ConversationPage, ApiError> {
        self.characters.get(character_id, Some(user))?;
        let key = store::parse_id(character_id)
            .ok_or_else(|| ApiError::character_not_found(character_id))?;
        let cursor = match before {
            Some(c) => Some(decode_cursor(c)?),
            None => None,
        };
        let store = self.store.clone();
        let uid = user.id.clone();
        Ok(blocking(move || store.list_conversations(&uid, key, cursor, limit)).await?)
    }

    /// Deletes one of the caller's conversations.
    pub async fn delete(&self, user: &User, cid: &str) -> Result<(), ApiError> {
        self.load_owned(cid, user)?;
        let key = store::parse_id(cid).ok_or_else(|| conversation_not_found(cid))?;
        let store = self.store.clone();
        blocking(move || store.delete_conversation(key)).await?;
        Ok(())
    }

    /// Replaces a message's text (and its current swipe).
    pub async fn edit_message(
        &self,
        user: &User,
        cid: &str,
        message_id: &str,
        content: String,
    ) -> Result<StoredMessage, ApiError> {
        let history = self.load_owned(cid, user)?;
        let mut m = find_message(&history, message_id)?.clone();
        if m.swipes.len() > m.swipe_id {
            m.swipes[m.swipe_id] = content.clone();
        }
        m.content = content;
        m.tokens = None;
        let mut conv = history.conversation.clone();
        conv.last_activity = crate::time::now_rfc3339();
        self.save(
            conv,
            Some(history.conversation.clone()),
            vec![m.clone()],
            vec![],
            0,
        )
        .await?;
        Ok(m)
    }

    /// Deletes a message.
    pub async fn delete_message(
        &self,
        user: &User,
        cid: &str,
        message_id: &str,
    ) -> Result<(), ApiError> {
        let history = self.load_owned(cid, user)?;
        let m = find_message(&history, message_id)?;
        let mut conv = history.conversation.clone();
        conv.message_count = conv.message_count.saturating_sub(1);
        conv.last_activity = crate::time::now_rfc3339();
        self.save(
            conv,
            Some(history.conversation.clone()),
            vec![],
            vec![m.seq],
            0,
        )
        .await?;
        Ok(())
    }

    /// Makes swipe `swipe_id` the shown text of a message.
    pub async fn choose_swipe(
        &self,
        user: &User,
        cid: &str,
        message_id: &str,
        swipe_id: usize,
    ) -> Result<StoredMessage, ApiError> {
        let history = self.load_owned(cid, user)?;
        let mut m = find_message(&history, message_id)?.clone();
        if swipe_id >= m.swipes.len().max(1) {
            return Err(ApiError::validation(
                "swipeId",
                format!("this message has {} swipe(s)", m.swipes.len().max(1)),
            ));
        }
        if !m.swipes.is_empty() {
            m.content = m.swipes[swipe_id].clone();
            m.swipe_id = swipe_id;
            m.tokens = None;
        }
        let mut conv = history.conversation.clone();
        conv.last_activity = crate::time::now_rfc3339();
        self.save(
            conv,
            Some(history.conversation.clone()),
            vec![m.clone()],
            vec![],
            0,
        )
        .await?;
        Ok(m)
    }

    /// The conversation as SillyTavern chat JSONL.
    pub fn export_jsonl(&self, user: &User, cid: &str) -> Result<(String, String), ApiError> {
        let history = self.load_owned(cid, user)?;
        let character = self
            .characters
            .get(&history.conversation.character_id, Some(user));
        let char_name = match &character {
            Ok(c) => char_display_name(c).to_string(),
            Err(_) => history
                .messages
                .iter()
                .find(|m| m.role == MessageRole::Character)
                .map(|m| m.name.clone())
                .unwrap_or_default(),
        };
        Ok((char_name.clone(), to_jsonl(&history, &char_name)))
    }

    /// Imports a SillyTavern chat JSONL file as a new conversation with a character the
    /// caller may view.
    pub async fn import_jsonl(
        &self,
        user: &User,
        character_id: &str,
        bytes: &[u8],
    ) -> Result<Arc<History>, ApiError> {
        let character = self.characters.get(character_id, Some(user))?;
        let (mut conversation, messages) = parse_jsonl(bytes, &character, user)?;
        conversation.message_count = messages.len() as u64;
        conversation.next_seq = messages.len() as u64;
        self.save(conversation, None, messages, vec![], 0).await
    }
}

/// 404 for a conversation that does not exist for the caller.
pub fn conversation_not_found(cid: &str) -> ApiError {
    ApiError::not_found(format!("conversation {cid} does not exist"))
}

fn find_message<'a>(h: &'a History, id: &str) -> Result<&'a StoredMessage, ApiError> {
    h.messages
        .iter()
        .map(std::sync::Arc::as_ref)
        .find(|m| m.id == id)
        .ok_or_else(|| {
            ApiError::not_found(format!("message {id} does not exist in this conversation"))
        })
}

/// Opaque cursor for conversation pages.
pub fn encode_cursor(c: (i64, u128)) -> String {
    use base64::Engine;
    let mut raw = c.0.to_be_bytes().to_vec();
    raw.extend_from_slice(&c.1.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(s: &str) -> Result<(i64, u128), ApiError> {
    use base64::Engine;
    let bad = || ApiError::validation("before", "not a cursor returned by this API");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    if raw.len() != 24 {
        return Err(bad());
    }
    let t = i64::from_be_bytes(raw[..8].try_into().map_err(|_| bad())?);
    let id = u128::from_be_bytes(raw[8..].try_into().map_err(|_| bad())?);
    Ok((t, id))
}

fn st_send_date(rfc: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc) {
        Ok(t) => t
            .with_timezone(&Utc)
            .format("%B %-d, %Y %-I:%M%P")
            .to_string(),
        Err(_) => rfc.to_string(),
    }
}

fn st_create_date(rfc: &str) -> String {
    match DateTime::parse_from_rfc3339(rfc) {
        Ok(t) => t
            .with_timezone(&Utc)
            .format("%Y-%m-%d@%Hh%Mm%Ss")
            .to_string(),
        Err(_) => rfc.to_string(),
    }
}

/// Parses SillyTavern's `send_date`: epoch ms, RFC 3339, or its human formats.
fn parse_send_date(v: &Value) -> Option<String> {
    if let Some(n) = v.as_i64() {
        return Some(crate::time::ms_to_rfc3339(n));
    }
    let s = v.as_str()?.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Some(crate::time::ms_to_rfc3339(n));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(crate::time::to_rfc3339(t.with_timezone(&Utc)));
    }
    let upper = s.to_uppercase();
    for fmt in [
        "%B %d, %Y %I:%M%p",
        "%B %d, %Y %I:%M %p",
        "%Y-%m-%d@%Hh%Mm%Ss",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&upper, fmt)
            .or_else(|_| NaiveDateTime::parse_from_str(s, fmt))
        {
            return Some(crate::time::to_rfc3339(Utc.from_utc_datetime(&t)));
        }
    }
    // "2024-10-01@10h00m00s123ms" and similar: keep the part chrono understands.
    if let Some((head, _)) = s.split_once('s') {
        if let Ok(t) = NaiveDateTime::parse_from_str(&format!("{head}s"), "%Y-%m-%d@%Hh%Mm%Ss") {
            return Some(crate::time::to_rfc3339(Utc.from_utc_datetime(&t)));
        }
    }
    None
}

fn to_jsonl(h: &History, char_name: &str) -> String {
    let c = &h.conversation;
    let header = json!({
        "user_name": c.user_name,
        "character_name": char_name,
        "create_date": st_create_date(&c.started_at),
        "chat_metadata": c.chat_metadata,
    });
    let mut lines = vec![header.to_string()];
    for m in &h.messages {
        let mut line = json!({
            "name": m.name,
            "is_user": m.role == MessageRole::User,
            "is_system": m.role == MessageRole::System,
            "send_date": st_send_date(&m.timestamp),
            "mes": m.content,
            "extra": m.extra,
        });
        if !m.swipes.is_empty() {
            line["swipe_id"] = json!(m.swipe_id);
            line["swipes"] = json!(m.swipes);
            line["swipe_info"] = json!(m.swipe_info);
        }
        lines.push(line.to_string());
    }
    lines.join("\n")
}

fn parse_jsonl(
    bytes: &[u8],
    character: &Character,
    user: &User,
) -> Result<(Conversation, Vec<StoredMessage>), ApiError> {
    let invalid = |line: usize, why: String| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("chat file line {line}: {why}"),
        )
        .with_details(json!({"field": "body", "line": line, "reason": why}))
    };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid(1, "not UTF-8".into()))?;
    let now = crate::time::now_rfc3339();
    let mut conversation = Conversation {
        id: Uuid::now_v7().to_string(),
        character_id: character.id.clone(),
        user_id: user.id.clone(),
        started_at: now.clone(),
        last_activity: now.clone(),
        title: None,
        message_count: 0,
        next_seq: 0,
        user_name: user.name.clone().unwrap_or_else(|| "User".into()),
        lore_state: Value::Null,
        character_state: None,
        seed: rand::random(),
        chat_metadata: Map::new(),
        plugin_state: Map::new(),
    };
    let mut messages: Vec<StoredMessage> = Vec::new();
    let mut last_time = now.clone();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| invalid(n, format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid(n, "not a JSON object".into()))?;
        let is_header = messages.is_empty()
            && !obj.contains_key("mes")
            && (obj.contains_key("user_name")
                || obj.contains_key("character_name")
                || obj.contains_key("chat_metadata"));
        if is_header {
            if let Some(u) = obj.get("user_name").and_then(Value::as_str) {
                conversation.user_name = u.to_string();
            }
            if let Some(m) = obj.get("chat_metadata").and_then(Value::as_object) {
                conversation.chat_metadata = m.clone();
            }
            if let Some(d) = obj.get("create_date").and_then(parse_send_date) {
                conversation.started_at = d;
            }
            continue;
        }
        let mes = obj
            .get("mes")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(n, "message has no `mes` text".into()))?;
        let role = if obj
            .get("is_system")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            MessageRole::System
        } else if obj.get("is_user").and_then(Value::as_bool).unwrap_or(false) {
            MessageRole::User
        } else {
            MessageRole::Character
        };
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(match role {
                MessageRole::User => &conversation.user_name,
                _ => &character.name,
            })
            .to_string();
        let timestamp = obj
            .get("send_date")
            .and_then(parse_send_date)
            .unwrap_or_else(|| last_time.clone());
        last_time = timestamp.clone();
        let mut m = new_message(messages.len() as u64, role, &name, mes.to_string());
        m.timestamp = timestamp;
        if let Some(extra) = obj.get("extra").and_then(Value::as_object) {
            m.extra = extra.clone();
        }
        if let Some(swipes) = obj.get("swipes").and_then(Value::as_array) {
            m.swipes = swipes
                .iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect();
            let id = obj.get("swipe_id").and_then(Value::as_u64).unwrap_or(0) as usize;
            m.swipe_id = id.min(m.swipes.len().saturating_sub(1));
            if m.swipes.get(m.swipe_id).map(String::as_str) != Some(mes) {
                // The shown text is the truth; keep it as the chosen swipe.
                if let Some(slot) = m.swipes.get_mut(m.swipe_id) {
                    *slot = mes.to_string();
                } else {
                    m.swipes.push(mes.to_string());
                }
            }
        }
        if let Some(info) = obj.get("swipe_info").and_then(Value::as_array) {
            m.swipe_info = info.clone();
        }
        messages.push(m);
        if messages.len() > MAX_IMPORT_MESSAGES {
            return Err(invalid(
                n,
                format!("more than {MAX_IMPORT_MESSAGES} messages"),
            ));
        }
    }
    if messages.is_empty() {
        return Err(invalid(1, "the chat file has no messages".into()));
    }
    conversation.last_activity = last_time;
    Ok((conversation, messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_macros_replace_names() {
        assert_eq!(
            greeting_macros("Hi {{User}}, I am {{char}} <BOT> <user>", "Sera", "Ann"),
            "Hi Ann, I am Sera Sera Ann"
        );
        assert_eq!(greeting_macros("{ {{x}} <b>", "S", "A"), "{ {{x}} <b>");
    }

    #[test]
    fn st_dates_parse() {
        assert!(parse_send_date(&json!("October 1, 2024 10:00am"))
            .unwrap()
            .starts_with("2024-10-01T10:00"));
        assert!(parse_send_date(&json!(1_700_000_000_000i64)).is_some());
        assert!(parse_send_date(&json!("2024-10-01@10h00m00s"))
            .unwrap()
            .starts_with("2024-10-01T10:00:00"));
        assert!(parse_send_date(&json!("2024-10-01@10h00m00s224ms")).is_some());
        assert!(parse_send_date(&json!("whenever")).is_none());
    }

    #[test]
    fn cursor_round_trips() {
        let c = (1_700_000_000_000, 42u128);
        assert_eq!(decode_cursor(&encode_cursor(c)).unwrap(), c);
        assert!(decode_cursor("nope").is_err());
    }
}
