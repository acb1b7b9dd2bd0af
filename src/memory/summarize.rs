//! The summarizer's prompts and reply parsing, in the spirit of SillyTavern's Summarize
//! extension: the previous summary plus the recent messages go to the upstream, which answers
//! with an updated summary; optionally a second call lists durable facts, one per line. Pure.

use crate::model::{MessageRole, StoredMessage};
use crate::upstream::{ChatMessage, GenParams, GenerateRequest};

/// Longest fact kept from an extraction reply, in bytes.
const MAX_FACT_BYTES: usize = 500;
/// Most facts kept from one extraction reply.
const MAX_FACTS: usize = 10;

/// The conversation as plain `Name: text` lines, oldest first.
pub fn transcript(messages: &[StoredMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        if m.role == MessageRole::System || m.content.trim().is_empty() {
            continue;
        }
        out.push_str(&m.name);
        out.push_str(": ");
        out.push_str(m.content.trim());
        out.push('\n');
    }
    out
}

fn request(
    character_id: &str,
    system: String,
    instruction: String,
    max_tokens: u32,
) -> GenerateRequest {
    GenerateRequest {
        character_id: character_id.to_string(),
        messages: vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", instruction.clone()),
        ],
        user_input: instruction,
        history: Vec::new(),
        params: GenParams {
            temperature: Some(0.2),
            max_tokens: Some(max_tokens),
            ..GenParams::default()
        },
        override_settings: None,
    }
}

/// The request that rolls `previous` forward over `messages`.
pub fn summary_request(
    character_id: &str,
    previous: Option<&str>,
    messages: &[StoredMessage],
    max_words: u32,
) -> GenerateRequest {
    let mut system = String::from(
        "You keep the long-term memory of a role-play chat. Write a concise summary of the story \
         so far: who the characters are, what happened, what was decided or revealed, and \
         anything the characters should remember later. Write in the past tense, in third \
         person, without commentary.\n\n",
    );
    if let Some(prev) = previous.filter(|p| !p.trim().is_empty()) {
        system.push_str("Summary so far:\n");
        system.push_str(prev.trim());
        system.push_str("\n\n");
    }
    system.push_str("New messages:\n");
    system.push_str(&transcript(messages));
    let instruction = format!(
        "Update the summary with the new messages, keeping what still matters from the summary \
         so far. Use at most {max_words} words and reply with the summary only."
    );
    request(
        character_id,
        system,
        instruction,
        max_words.saturating_mul(2).max(64),
    )
}

/// The request that asks for durable facts about the user and the story, one per line.
pub fn facts_request(character_id: &str, messages: &[StoredMessage]) -> GenerateRequest {
    let system = format!(
        "You extract durable facts from a role-play chat: stable details about the user, the \
         characters and the world that will still be true later (names, relationships, \
         preferences, promises). Skip small talk.\n\nMessages:\n{}",
        transcript(messages)
    );
    let instruction = format!(
        "List at most {MAX_FACTS} facts, one short sentence per line, with no numbering. Reply \
         with NONE if there are none."
    );
    request(character_id, system, instruction, 300)
}

/// Facts from an extraction reply: one per non-empty line, list markers stripped, `NONE` and
/// duplicates dropped, bounded in count and length.
pub fn parse_facts(reply: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in reply.lines() {
        let fact = line
            .trim()
            .trim_start_matches(['-', '*', '•'])
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start_matches(['.', ')'])
            .trim();
        if fact.is_empty() || fact.eq_ignore_ascii_case("none") || fact.len() > MAX_FACT_BYTES {
            continue;
        }
        if !out.iter().any(|f| f.eq_ignore_ascii_case(fact)) {
            out.push(fact.to_string());
        }
        if out.len() == MAX_FACTS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_parsed_one_per_line() {
        let cases: [(&str, Vec<&str>); 4] = [
            (
                "- The user is Ada\n2. Ada likes tea\n\n",
                vec!["The user is Ada", "Ada likes tea"],
            ),
            ("NONE", vec![]),
            ("* a\n* A\n• b", vec!["a", "b"]),
            ("", vec![]),
        ];
        for (reply, expected) in cases {
            assert_eq!(parse_facts(reply), expected, "reply {reply:?}");
        }
    }

    #[test]
    fn summary_prompt_carries_previous_summary_and_messages() {
        let m = crate::conversations::new_message(
            3,
            MessageRole::User,
            "Ada",
            "I found the key".into(),
        );
        let req = summary_request("c1", Some("Ada arrived."), &[m], 100);
        let system = &req.messages[0].content;
        assert!(system.contains("Ada arrived."));
        assert!(system.contains("Ada: I found the key"));
        assert!(req.messages[1].content.contains("100 words"));
    }
}
