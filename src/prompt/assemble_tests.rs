//! Data-driven tests of prompt order, macros in sections, injections and budget trimming.

use super::*;
use crate::prompt::lorebook::CompiledLorebook;
use crate::prompt::tokens::shared;
use chrono::TimeZone;
use serde_json::json;

fn character(top: Value, profile: Value) -> Character {
    let mut v = json!({
        "id": "c1", "name": "Sera", "description": "", "createdAt": "2026-01-01T00:00:00Z",
        "updatedAt": "2026-01-01T00:00:00Z", "personality": {}, "isPublic": false, "isActive": true,
        "usageCount": 0, "creatorId": "u1", "version": 1
    });
    for (k, val) in top.as_object().unwrap() {
        v[k] = val.clone();
    }
    v["personality"] = profile;
    serde_json::from_value(v).unwrap()
}

fn msg(role: Role, content: &str) -> HistoryMessage<'static> {
    HistoryMessage {
        role,
        name: if role == Role::User { "Ann" } else { "Sera" }.into(),
        content: content.to_owned().into(),
        tokens: None,
    }
}

struct Fixture {
    character: Character,
    book: Option<CompiledLorebook>,
    history: Vec<HistoryMessage<'static>>,
    persona: String,
    memory: Option<MemoryBlock>,
    budget: Budget,
    options: PromptOptions,
    extra: Vec<ExtraSection>,
}

impl Fixture {
    fn new(character: Character, history: Vec<HistoryMessage<'static>>) -> Self {
        let book = character
            .personality
            .character_book
            .as_ref()
            .map(|b| CompiledLorebook::compile(b, &shared()));
        Fixture {
            character,
            book,
            history,
            persona: String::new(),
            memory: None,
            budget: Budget {
                max_context_tokens: 100_000,
                max_reply_tokens: 1000,
            },
            options: PromptOptions::default(),
            extra: Vec::new(),
        }
    }

    fn build(&self) -> AssembledPrompt {
        let state = LoreState::default();
        let input = PromptInput {
            character: &self.character,
            lorebook: self.book.as_ref(),
            user_name: "Ann",
            persona: &self.persona,
            history: &self.history,
            memory: self.memory.as_ref(),
            budget: self.budget,
            lore_state: &state,
            rng_seed: 1,
            conversation_seed: 2,
            now: FixedOffset::east_opt(0)
                .unwrap()
                .with_ymd_and_hms(2026, 11, 26, 12, 0, 0)
                .unwrap(),
            extra_sections: &self.extra,
            options: &self.options,
        };
        assemble(&input, &shared())
    }
}

fn render(p: &AssembledPrompt) -> Vec<String> {
    p.messages
        .iter()
        .map(|m| {
            let role = serde_json::to_value(m.role).unwrap();
            format!("{}: {}", role.as_str().unwrap(), m.content)
        })
        .collect()
}

fn check(f: &Fixture, expected: &[&str]) -> AssembledPrompt {
    let p = f.build();
    assert_eq!(render(&p), expected);
    p
}

fn full_card() -> Character {
    character(
        json!({"description": "D {{user}}", "scenario": "S", "mesExample":
            "<START>\n{{user}}: hi\n{{char}}: hello\n<START>\nB2"}),
        json!({"personality": "P", "postHistoryInstructions": "PHI {{char}}",
        "characterBook": {"entries": [
            {"id": 1, "keys": [], "constant": true, "content": "WB {{char}}", "position": "before_char"},
            {"id": 2, "keys": [], "constant": true, "content": "WA", "position": "after_char"},
        ]}}),
    )
}

#[test]
fn section_order_matches_sillytavern() {
    let mut f = Fixture::new(
        full_card(),
        vec![msg(Role::Assistant, "Hi"), msg(Role::User, "Yo")],
    );
    f.persona = "I am {{user}}".into();
    f.memory = Some(MemoryBlock {
        summary: "Sum".into(),
        recalled: vec!["m1".into(), "m2".into()],
    });
    check(
        &f,
        &[
            "system: Write Sera's next reply in a fictional chat between Sera and Ann.",
            "system: WB Sera",
            "system: I am Ann",
            "system: D Ann",
            "system: [Sera's personality: P]",
            "system: [Circumstances and context of the dialogue: S]",
            "system: WA",
            "system: [Example Chat]\nAnn: hi\nSera: hello",
            "system: [Example Chat]\nB2",
            "system: Sum\nm1\nm2",
            "system: [Start a new Chat]",
            "assistant: Hi",
            "user: Yo",
            "system: PHI Sera",
        ],
    );
}

#[test]
fn empty_sections_are_skipped_and_nickname_replaces_char() {
    let c = character(json!({}), json!({"nickname": "Sy"}));
    let f = Fixture::new(c, vec![msg(Role::User, "Yo")]);
    check(
        &f,
        &[
            "system: Write Sy's next reply in a fictional chat between Sy and Ann.",
            "system: [Start a new Chat]",
            "user: Yo",
        ],
    );
}

#[test]
fn original_expands_to_the_default_once() {
    let c = character(
        json!({}),
        json!({"systemPrompt": "{{original}} Be vivid.{{original}}",
            "postHistoryInstructions": "{{original}} Go."}),
    );
    let mut f = Fixture::new(c, vec![msg(Role::User, "Yo")]);
    f.options.post_history_instructions = "Stay {{char}}.".into();
    check(
        &f,
        &[
            "system: Write Sera's next reply in a fictional chat between Sera and Ann. Be vivid.",
            "system: [Start a new Chat]",
            "user: Yo",
            "system: Stay Sera. Go.",
        ],
    );
    // Without card overrides the defaults are used as they are.
    let f = Fixture::new(character(json!({}), json!({"systemPrompt": ""})), vec![]);
    assert_eq!(
        render(&f.build())[0],
        "system: Write Sera's next reply in a fictional chat between Sera and Ann."
    );
}

#[test]
fn depth_prompt_is_injected_at_its_depth_and_role() {
    let history = vec![
        msg(Role::Assistant, "a1"),
        msg(Role::User, "u1"),
        msg(Role::Assistant, "a2"),
        msg(Role::User, "u2"),
    ];
    let mk = |dp: Value| {
        Fixture::new(
            character(json!({}), json!({"extensions": {"depth_prompt": dp}})),
            history.clone(),
        )
    };
    let tail = |p: &AssembledPrompt| render(p)[2..].to_vec();
    assert_eq!(
        tail(&mk(json!({"prompt": "Note {{char}}", "depth": 1, "role": "user"})).build()),
        [
            "assistant: a1",
            "user: u1",
            "assistant: a2",
            "user: Note Sera",
            "user: u2"
        ]
    );
    assert_eq!(
        tail(&mk(json!({"prompt": "N", "depth": 0})).build()),
        [
            "assistant: a1",
            "user: u1",
            "assistant: a2",
            "user: u2",
            "system: N"
        ]
    );
    // Default depth 4, deeper than the chat: before the first message.
    assert_eq!(
        tail(&mk(json!({"prompt": "N"})).build()),
        [
            "system: N",
            "assistant: a1",
            "user: u1",
            "assistant: a2",
            "user: u2"
        ]
    );
    assert_eq!(
        tail(&mk(json!({"prompt": "N", "depth": 2, "role": "assistant"})).build()),
        [
            "assistant: a1",
            "user: u1",
            "assistant: N",
            "assistant: a2",
            "user: u2"
        ]
    );
    assert_eq!(
        tail(&mk(json!({"prompt": "  "})).build()).len(),
        4,
        "empty prompt is skipped"
    );
}

#[test]
fn lorebook_positions_in_the_prompt() {
    let c = character(
        json!({"mesExample": "<START>\nEX"}),
        json!({"extensions": {"depth_prompt": {"prompt": "DP", "depth": 1}}, "characterBook": {"entries": [
            {"id": 1, "keys": ["go"], "content": "AT1", "extensions": {"position": 4, "depth": 1, "role": 0}, "insertion_order": 5},
            {"id": 2, "keys": ["go"], "content": "AT1b", "extensions": {"position": 4, "depth": 1, "role": 0}, "insertion_order": 6},
            {"id": 3, "keys": ["go"], "content": "AT1u", "extensions": {"position": 4, "depth": 1, "role": 1}},
            {"id": 4, "keys": ["go"], "content": "ANB", "extensions": {"position": 3}},
            {"id": 5, "keys": ["go"], "content": "ANT", "extensions": {"position": 2}},
            {"id": 6, "keys": ["go"], "content": "EMT", "extensions": {"position": 5}},
            {"id": 7, "keys": ["go"], "content": "EMB", "extensions": {"position": 6}},
            {"id": 8, "keys": ["go"], "content": "B1", "extensions": {"position": 0}, "insertion_order": 2},
            {"id": 9, "keys": ["go"], "content": "B0", "extensions": {"position": 0}, "insertion_order": 1},
        ]}}),
    );
    let f = Fixture::new(c, vec![msg(Role::Assistant, "hi"), msg(Role::User, "go")]);
    check(
        &f,
        &[
            "system: Write Sera's next reply in a fictional chat between Sera and Ann.",
            "system: B0\nB1",
            "system: EMT",
            "system: [Example Chat]\nEX",
            "system: EMB",
            "system: [Start a new Chat]",
            "system: ANT\nANB",
            "assistant: hi",
            "system: DP\nAT1\nAT1b",
            "user: AT1u",
            "user: go",
        ],
    );
}

#[test]
fn extra_sections_are_placed() {
    let mut f = Fixture::new(
        character(json!({}), json!({})),
        vec![msg(Role::Assistant, "hi"), msg(Role::User, "go")],
    );
    let sec = |name: &str, role, position| ExtraSection {
        name: name.into(),
        content: format!("{name} {{{{user}}}}"),
        role,
        position,
    };
    f.extra = vec![
        sec("before", Role::System, SectionPosition::BeforeHistory),
        sec("after", Role::User, SectionPosition::AfterHistory),
        sec("deep", Role::Assistant, SectionPosition::Depth(1)),
    ];
    let p = check(
        &f,
        &[
            "system: Write Sera's next reply in a fictional chat between Sera and Ann.",
            "system: before Ann",
            "system: [Start a new Chat]",
            "assistant: hi",
            "assistant: deep Ann",
            "user: go",
            "user: after Ann",
        ],
    );
    assert!(p.itemization.sections.iter().any(|s| s.section == "before"));
}

#[test]
fn example_blocks_split_on_start() {
    let cases: [(&str, &[&str]); 4] = [
        ("", &[]),
        ("just one", &["just one"]),
        ("<START>\na\n<start>\n\nb\n<START>", &["a", "b"]),
        ("pre<START>x", &["pre", "x"]),
    ];
    for (input, expected) in cases {
        assert_eq!(example_blocks(input), expected, "{input:?}");
    }
}

#[test]
fn budget_drops_oldest_history_first_then_examples() {
    let c = character(
        json!({"mesExample": "<START>\nfirst example block\n<START>\nsecond example block"}),
        json!({}),
    );
    let history: Vec<HistoryMessage<'static>> = (0..10)
        .map(|i| HistoryMessage {
            tokens: Some(10),
            ..msg(
                if i % 2 == 0 {
                    Role::Assistant
                } else {
                    Role::User
                },
                &format!("m{i}"),
            )
        })
        .collect();
    let mut f = Fixture::new(c, history);
    let all = f.build();
    assert_eq!(all.itemization.history_kept, 10);
    assert_eq!(all.itemization.example_blocks_kept, 2);
    let t = shared();
    let e1 = t.count("[Example Chat]\nfirst example block") + MESSAGE_OVERHEAD;
    let e2 = t.count("[Example Chat]\nsecond example block") + MESSAGE_OVERHEAD;
    let fixed = all.itemization.total_tokens - 10 * 13 - e1 - e2;

    // Room for exactly three history messages: the newest three, no examples.
    f.budget = Budget {
        max_context_tokens: fixed + 3 * 13 + 50,
        max_reply_tokens: 50,
    };
    let p = f.build();
    let r = render(&p);
    assert_eq!(r[r.len() - 3..], ["user: m7", "assistant: m8", "user: m9"]);
    assert_eq!(
        (p.itemization.history_kept, p.itemization.history_dropped),
        (3, 7)
    );
    assert_eq!(p.itemization.example_blocks_kept, 0);
    assert!(!r.iter().any(|m| m.contains("[Example Chat]")));
    assert!(p.itemization.total_tokens <= p.itemization.budget_tokens);

    // All history plus the first example block.
    f.budget.max_context_tokens = fixed + 10 * 13 + e1 + 50;
    let p = f.build();
    assert_eq!(p.itemization.history_kept, 10);
    assert_eq!(p.itemization.example_blocks_kept, 1);
    assert_eq!(p.itemization.total_tokens, p.itemization.budget_tokens);
    assert!(render(&p).contains(&"system: [Example Chat]\nfirst example block".to_owned()));

    // Too small for anything: the newest message is still sent, flagged as over budget.
    f.budget.max_context_tokens = 60;
    let p = f.build();
    assert!(p.itemization.over_budget);
    assert_eq!(p.itemization.history_kept, 1);
}

#[test]
fn greeting_swipes() {
    let c = character(
        json!({"firstMes": "Hello {{user}}"}),
        json!({"alternateGreetings": ["Alt {{char}}", ""]}),
    );
    let ctx = MacroContext::names(
        "Sera",
        "Ann",
        FixedOffset::east_opt(0)
            .unwrap()
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .unwrap(),
    );
    assert_eq!(render_greeting(&c, 0, &ctx).as_deref(), Some("Hello Ann"));
    assert_eq!(render_greeting(&c, 1, &ctx).as_deref(), Some("Alt Sera"));
    assert_eq!(render_greeting(&c, 2, &ctx), None);
    assert_eq!(render_greeting(&c, 3, &ctx), None);
}

#[test]
fn split_for_sillytavern_upstream() {
    let p = Fixture::new(
        full_card(),
        vec![msg(Role::Assistant, "Hi"), msg(Role::User, "Yo")],
    )
    .build();
    let s = to_sillytavern(&p);
    assert!(s.system_prompt.starts_with("Write Sera's next reply"));
    assert!(s
        .system_prompt
        .ends_with("[Example Chat]\nB2\n\n[Start a new Chat]"));
    let roles: Vec<Role> = s.history.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::Assistant, Role::User, Role::System]);
}

#[test]
fn itemization_counts_sections_and_serializes_camel_case() {
    let p = Fixture::new(
        full_card(),
        vec![msg(Role::Assistant, "Hi there"), msg(Role::User, "Yo")],
    )
    .build();
    let it = &p.itemization;
    let hist = it
        .sections
        .iter()
        .find(|s| s.section == "chatHistory")
        .unwrap();
    assert_eq!((hist.messages, hist.tokens), (2, 3));
    let sum: usize = it
        .sections
        .iter()
        .map(|s| s.tokens + s.messages * MESSAGE_OVERHEAD)
        .sum();
    assert_eq!(it.total_tokens, sum + REPLY_PRIMING);
    assert_eq!(it.lorebook.activated.len(), 2);
    let v = serde_json::to_value(&p).unwrap();
    assert!(v["itemization"]["historyKept"].is_number());
    assert!(v["itemization"]["loreState"]["effects"].is_object());
    assert_eq!(v["messages"][0]["role"], "system");
}

/// The real Seraphina card (fields extracted verbatim from `default_Seraphina.png`) with its
/// four Eldoria entries: the greeting mentions the forest, beasts and magic, so entries 0, 1 and
/// 3 fire before the description; the glade entry does not.
#[test]
fn seraphina_exact_messages() {
    let fields: Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/seraphina_prompt_fields.json"
    ))
    .unwrap();
    let s = |k: &str| fields[k].as_str().unwrap().to_owned();
    let c = character(
        json!({"name": s("name"), "description": s("description"), "firstMes": s("first_mes")}),
        json!({"personality": s("personality"), "systemPrompt": s("system_prompt"),
            "postHistoryInstructions": s("post_history_instructions"),
            "characterBook": fields["character_book"]}),
    );
    let greeting = s("first_mes");
    let f = Fixture::new(
        c,
        vec![
            HistoryMessage {
                role: Role::Assistant,
                name: "Seraphina".into(),
                content: greeting.clone().into(),
                tokens: None,
            },
            msg(Role::User, "Thank you. Who attacked me?"),
        ],
    );
    let p = f.build();
    let names = |t: &str| {
        t.replace("{{user}}", "Ann")
            .replace("{{char}}", "Seraphina")
    };
    let entry = |i: usize| {
        names(
            fields["character_book"]["entries"][i]["content"]
                .as_str()
                .unwrap(),
        )
    };
    let expected = vec![
        PromptMessage {
            role: Role::System,
            content: "Write Seraphina's next reply in a fictional chat between Seraphina and Ann."
                .into(),
        },
        PromptMessage {
            role: Role::System,
            content: format!("{}\n{}\n{}", entry(0), entry(1), entry(3)),
        },
        PromptMessage {
            role: Role::System,
            content: names(&s("description")),
        },
        PromptMessage {
            role: Role::System,
            content: "[Start a new Chat]".into(),
        },
        PromptMessage {
            role: Role::Assistant,
            content: greeting,
        },
        PromptMessage {
            role: Role::User,
            content: "Thank you. Who attacked me?".into(),
        },
    ];
    assert_eq!(p.messages, expected);
    let reasons: Vec<(String, FireReasonKey)> = p
        .itemization
        .lorebook
        .activated
        .iter()
        .map(|f| (f.uid.clone(), key_of(&f.reason)))
        .collect();
    assert_eq!(
        reasons,
        [
            ("0".to_owned(), Some("forest".to_owned())),
            ("1".to_owned(), Some("beast".to_owned())),
            ("3".to_owned(), Some("magic".to_owned())),
        ]
    );
}

type FireReasonKey = Option<String>;

fn key_of(r: &lorebook::FireReason) -> FireReasonKey {
    match r {
        lorebook::FireReason::Key { key, .. } => Some(key.clone()),
        _ => None,
    }
}

#[test]
fn macros_see_the_chat_and_the_clock() {
    let c = character(
        json!({"scenario": "{{lastUserMessage}} / {{lastCharMessage}} on {{weekday}} {{isodate}}"}),
        json!({}),
    );
    let f = Fixture::new(c, vec![msg(Role::Assistant, "Hi"), msg(Role::User, "Yo")]);
    let r = render(&f.build());
    assert_eq!(
        r[1],
        "system: [Circumstances and context of the dialogue: Yo / Hi on Thursday 2026-11-26]"
    );
}

#[test]
fn lore_state_comes_back_updated_and_stored_token_counts_are_used() {
    let c = character(
        json!({}),
        json!({"characterBook": {"entries": [
            {"id": "s", "keys": ["go"], "content": "Sticky lore", "extensions": {"sticky": 3}},
        ]}}),
    );
    let mut history = vec![msg(Role::Assistant, "hi"), msg(Role::User, "go")];
    history[0].tokens = Some(100);
    let f = Fixture::new(c, history);
    let p = f.build();
    assert_eq!(p.lore_state().effects["s"].sticky_until, 5);
    let hist = p
        .itemization
        .sections
        .iter()
        .find(|s| s.section == "chatHistory")
        .unwrap();
    assert_eq!(hist.tokens, 101, "stored 100 + counted 'go'");
}

#[test]
fn lorebook_content_gets_macros() {
    let c = character(
        json!({}),
        json!({"nickname": "Sy", "characterBook": {"entries": [
            {"id": 1, "keys": ["go"], "content": "{{char}} helps {{user}}.{{// hidden}}"},
        ]}}),
    );
    let f = Fixture::new(c, vec![msg(Role::User, "go")]);
    assert_eq!(render(&f.build())[1], "system: Sy helps Ann.");
}
