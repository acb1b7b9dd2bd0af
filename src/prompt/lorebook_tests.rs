//! One data-driven test per SillyTavern lorebook rule.

use super::*;
use serde_json::json;

fn tok() -> std::sync::Arc<Tokenizer> {
    crate::prompt::tokens::shared()
}

fn book(v: Value) -> CharacterBook {
    serde_json::from_value(v).unwrap()
}

/// A book of entries given as JSON, with defaults for the rest.
fn entries(entries: Value) -> CharacterBook {
    book(json!({ "entries": entries }))
}

fn chat(msgs: &[(&str, &str)]) -> Vec<HistoryMessage<'static>> {
    msgs.iter()
        .map(|(name, content)| HistoryMessage {
            role: if *name == "Ann" {
                Role::User
            } else {
                Role::Assistant
            },
            name: (*name).to_owned().into(),
            content: (*content).to_owned().into(),
            tokens: None,
        })
        .collect()
}

struct Run {
    uids: Vec<String>,
    report: LoreReport,
    state: LoreState,
}

fn run_with(
    b: &CharacterBook,
    msgs: &[(&str, &str)],
    budget: usize,
    state: &LoreState,
    seed: u64,
) -> Run {
    let compiled = CompiledLorebook::compile(b, &tok());
    let history = chat(msgs);
    let act = activate(
        &compiled,
        &ActivationInput {
            history: &history,
            budget_tokens: budget,
            state,
            rng_seed: seed,
        },
    );
    Run {
        uids: act
            .entries
            .iter()
            .map(|i| compiled.entry(*i).unwrap().uid.clone())
            .collect(),
        report: act.report,
        state: act.state,
    }
}

fn run(b: &CharacterBook, msgs: &[(&str, &str)]) -> Run {
    run_with(b, msgs, 10_000, &LoreState::default(), 1)
}

/// Asserts which entries fire (in output order) for a chat.
fn check(b: &CharacterBook, msgs: &[(&str, &str)], expected: &[&str]) -> Run {
    let r = run(b, msgs);
    assert_eq!(r.uids, expected, "report: {:#?}", r.report);
    r
}

fn rejected(r: &Run, uid: &str) -> RejectReason {
    r.report
        .rejected
        .iter()
        .find(|x| x.uid == uid)
        .unwrap_or_else(|| panic!("{uid} not rejected: {:#?}", r.report))
        .reason
        .clone()
}

fn fired(r: &Run, uid: &str) -> FireReason {
    r.report
        .activated
        .iter()
        .find(|x| x.uid == uid)
        .unwrap_or_else(|| panic!("{uid} not fired: {:#?}", r.report))
        .reason
        .clone()
}

#[test]
fn plain_keys_match_case_insensitively_and_report_the_key() {
    let b = entries(json!([
        {"id": 1, "keys": ["forest", "wood"], "content": "F"},
        {"id": 2, "keys": ["castle"], "content": "C"},
    ]));
    let r = check(&b, &[("Sera", "Into the FOREST we go")], &["1"]);
    assert_eq!(
        fired(&r, "1"),
        FireReason::Key {
            key: "forest".into(),
            secondary_keys: vec![]
        }
    );
}

#[test]
fn scan_buffer_is_name_colon_text() {
    let b = entries(json!([{"id": 1, "keys": ["ann: hello"], "content": "x"}]));
    check(&b, &[("Ann", "Hello there")], &["1"]);
}

#[test]
fn scan_depth_default_two_book_and_entry_override() {
    let msgs = [("Ann", "a dragon"), ("Sera", "b"), ("Ann", "c")];
    let e = json!([{"id": 1, "keys": ["dragon"], "content": "x"}]);
    check(&entries(e.clone()), &msgs, &[]);
    check(&book(json!({"scan_depth": 3, "entries": e})), &msgs, &["1"]);
    let per_entry =
        json!([{"id": 1, "keys": ["dragon"], "content": "x", "extensions": {"scan_depth": 3}}]);
    check(&entries(per_entry), &msgs, &["1"]);
    let zero = json!([{"id": 1, "keys": ["c"], "content": "x", "extensions": {"scan_depth": 0}}]);
    check(&entries(zero), &msgs, &[]);
}

#[test]
fn case_sensitive_from_extensions_or_card_field() {
    let ext = entries(
        json!([{"id": 1, "keys": ["Forest"], "content": "x", "extensions": {"case_sensitive": true}}]),
    );
    check(&ext, &[("Ann", "the forest")], &[]);
    check(&ext, &[("Ann", "the Forest")], &["1"]);
    let card =
        entries(json!([{"id": 1, "keys": ["Forest"], "content": "x", "case_sensitive": true}]));
    check(&card, &[("Ann", "the forest")], &[]);
    // The extension (SillyTavern's own field) wins over the card field.
    let both = entries(
        json!([{"id": 1, "keys": ["Forest"], "content": "x", "case_sensitive": true,
        "extensions": {"case_sensitive": false}}]),
    );
    check(&both, &[("Ann", "the forest")], &["1"]);
}

#[test]
fn whole_words() {
    let b = entries(json!([
        {"id": 1, "keys": ["cat"], "content": "x", "extensions": {"match_whole_words": true}},
        {"id": 2, "keys": ["cat"], "content": "x"},
        {"id": 3, "keys": ["big cat"], "content": "x", "extensions": {"match_whole_words": true}},
    ]));
    check(&b, &[("Ann", "a category")], &["2"]);
    check(&b, &[("Ann", "a cat, really")], &["1", "2"]);
    check(&b, &[("Ann", "the big catalogue")], &["2", "3"]);
    check(&b, &[("Ann", "cat")], &["1", "2"]);
}

#[test]
fn regex_keys_with_flags() {
    let b = entries(json!([
        {"id": 1, "keys": ["/fore?st/"], "content": "x"},
        {"id": 2, "keys": ["/DRAGON/i"], "content": "x"},
        {"id": 3, "keys": ["/^b.c$/ms"], "content": "x"},
        {"id": 4, "keys": ["/DRAGON/"], "content": "x"},
    ]));
    check(&b, &[("Ann", "a forst and a dragon")], &["1", "2"]);
    check(&b, &[("Ann", "x\nb\nc")], &["3"]);
}

#[test]
fn use_regex_entries_treat_every_key_as_a_pattern() {
    let b = entries(json!([{"id": 1, "keys": ["dra+gon"], "content": "x", "use_regex": true}]));
    check(&b, &[("Ann", "a DRAAGON")], &["1"]);
}

#[test]
fn invalid_regex_is_a_reported_non_match() {
    let b = entries(json!([
        {"id": 1, "keys": ["/([a/"], "content": "x"},
        {"id": 2, "keys": ["/([a/", "ok"], "content": "y"},
    ]));
    let r = check(&b, &[("Ann", "([a ok")], &["2"]);
    assert_eq!(r.report.warnings.len(), 2, "{:?}", r.report.warnings);
    assert!(r.report.warnings[0].contains("invalid regex"));
}

#[test]
fn selective_logic_all_four() {
    let mk = |logic: u8| {
        entries(
            json!([{"id": 1, "keys": ["sword"], "secondary_keys": ["fire", "ice"], "selective": true,
            "content": "x", "extensions": {"selectiveLogic": logic}}]),
        )
    };
    // (logic, text, fires)
    let cases = [
        (0, "sword", false),
        (0, "sword fire", true),
        (0, "sword fire ice", true),
        (1, "sword", true),
        (1, "sword fire", true),
        (1, "sword fire ice", false),
        (2, "sword", true),
        (2, "sword ice", false),
        (3, "sword fire", false),
        (3, "sword fire ice", true),
        (3, "fire ice", false),
    ];
    for (logic, text, fires) in cases {
        let r = run(&mk(logic), &[("Ann", text)]);
        assert_eq!(!r.uids.is_empty(), fires, "logic {logic} on {text:?}");
    }
    let r = run(&mk(3), &[("Ann", "sword fire ice")]);
    assert_eq!(
        fired(&r, "1"),
        FireReason::Key {
            key: "sword".into(),
            secondary_keys: vec!["fire".into(), "ice".into()]
        }
    );
    // Not selective: secondary keys are ignored.
    let plain = entries(
        json!([{"id": 1, "keys": ["sword"], "secondary_keys": ["fire"], "selective": false, "content": "x"}]),
    );
    check(&plain, &[("Ann", "sword")], &["1"]);
}

#[test]
fn constant_fires_without_keys_and_disabled_never_does() {
    let b = entries(json!([
        {"id": 1, "keys": [], "content": "x", "constant": true},
        {"id": 2, "keys": ["a"], "content": "x", "enabled": false},
    ]));
    let r = check(&b, &[("Ann", "a")], &["1"]);
    assert_eq!(fired(&r, "1"), FireReason::Constant);
}

#[test]
fn probability_zero_hundred_and_seeded() {
    let b = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "extensions": {"probability": 0, "useProbability": true}},
        {"id": 2, "keys": ["a"], "content": "x", "extensions": {"probability": 100}},
        {"id": 3, "keys": ["a"], "content": "x", "extensions": {"probability": 0, "useProbability": false}},
        {"id": 4, "keys": ["a"], "content": "x", "extensions": {"probability": null}},
    ]));
    let r = check(&b, &[("Ann", "a")], &["2", "3", "4"]);
    assert!(matches!(
        rejected(&r, "1"),
        RejectReason::Probability { probability: 0, .. }
    ));

    let half = entries(
        json!([{"id": 1, "keys": ["a"], "content": "x", "extensions": {"probability": 50}}]),
    );
    let outcomes: Vec<bool> = (0..40)
        .map(|seed| {
            !run_with(&half, &[("Ann", "a")], 1000, &LoreState::default(), seed)
                .uids
                .is_empty()
        })
        .collect();
    assert!(outcomes.iter().any(|x| *x) && outcomes.iter().any(|x| !x));
    let again: Vec<bool> = (0..40)
        .map(|seed| {
            !run_with(&half, &[("Ann", "a")], 1000, &LoreState::default(), seed)
                .uids
                .is_empty()
        })
        .collect();
    assert_eq!(outcomes, again, "same seed, same rolls");
}

#[test]
fn inclusion_group_weighted() {
    let b = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "extensions": {"group": "g", "group_weight": 0}},
        {"id": 2, "keys": ["a"], "content": "x", "extensions": {"group": "g", "group_weight": 100}},
        {"id": 3, "keys": ["a"], "content": "x"},
    ]));
    let r = check(&b, &[("Ann", "a")], &["2", "3"]);
    assert_eq!(
        rejected(&r, "1"),
        RejectReason::GroupLost {
            group: "g".into(),
            winner: "2".into()
        }
    );
    // Equal weights: both can win depending on the seed, one at a time.
    let even = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "extensions": {"group": "g"}},
        {"id": 2, "keys": ["a"], "content": "x", "extensions": {"group": "g"}},
    ]));
    let winners: std::collections::BTreeSet<Vec<String>> = (0..30)
        .map(|s| run_with(&even, &[("Ann", "a")], 1000, &LoreState::default(), s).uids)
        .collect();
    assert_eq!(winners.len(), 2);
    assert!(winners.iter().all(|w| w.len() == 1));
}

#[test]
fn inclusion_group_override_takes_highest_order() {
    let b = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "insertion_order": 10, "extensions": {"group": "g", "group_override": true}},
        {"id": 2, "keys": ["a"], "content": "x", "insertion_order": 50, "extensions": {"group": "g", "group_override": true}},
        {"id": 3, "keys": ["a"], "content": "x", "insertion_order": 90, "extensions": {"group": "g"}},
    ]));
    check(&b, &[("Ann", "a")], &["2"]);
}

#[test]
fn entry_in_several_groups_must_win_all() {
    let b = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "insertion_order": 90, "extensions": {"group": "g1, g2", "group_override": true}},
        {"id": 2, "keys": ["a"], "content": "x", "insertion_order": 10, "extensions": {"group": "g2", "group_override": true}},
        {"id": 3, "keys": ["a"], "content": "x", "insertion_order": 10, "extensions": {"group": "g3"}},
    ]));
    check(&b, &[("Ann", "a")], &["3", "1"]);
}

#[test]
fn budget_crossing_entry_is_dropped_and_scanning_stops() {
    // Each content is 10 tokens ("w" repeated); higher order is added first.
    let ten = "w ".repeat(10);
    let b = book(json!({"recursive_scanning": true, "entries": [
        {"id": 1, "keys": ["a"], "content": ten, "insertion_order": 30},
        {"id": 2, "keys": ["a"], "content": format!("{ten} b"), "insertion_order": 20},
        {"id": 3, "keys": ["a"], "content": ten, "insertion_order": 10},
        {"id": 4, "keys": ["b"], "content": "recursed"},
    ]}));
    let t = tok();
    let c = CompiledLorebook::compile(&b, &t);
    let budget = c.entry(0).unwrap().tokens + 5;
    let r = run_with(&b, &[("Ann", "a")], budget, &LoreState::default(), 1);
    assert_eq!(r.uids, ["1"]);
    assert!(matches!(rejected(&r, "2"), RejectReason::Budget { .. }));
    assert!(matches!(rejected(&r, "3"), RejectReason::Budget { .. }));
    assert_eq!(r.report.passes, 1, "no recursion after an overflow");
    assert!(r.report.used_tokens <= budget);
}

#[test]
fn recursion_prevent_exclude_and_delay() {
    let base = |a_ext: Value, b_ext: Value, recursive: bool| {
        book(json!({"recursive_scanning": recursive, "entries": [
            {"id": "a", "keys": ["apple"], "content": "The banana tree.", "extensions": a_ext},
            {"id": "b", "keys": ["banana"], "content": "Bananas!", "extensions": b_ext},
        ]}))
    };
    let msgs = [("Ann", "an apple")];
    check(&base(json!({}), json!({}), false), &msgs, &["a"]);
    let r = check(&base(json!({}), json!({}), true), &msgs, &["a", "b"]);
    assert_eq!(
        fired(&r, "b"),
        FireReason::Recursion {
            key: "banana".into(),
            secondary_keys: vec![],
            pass: 1
        }
    );
    check(
        &base(json!({"prevent_recursion": true}), json!({}), true),
        &msgs,
        &["a"],
    );
    check(
        &base(json!({}), json!({"exclude_recursion": true}), true),
        &msgs,
        &["a"],
    );
    // An excluded entry still fires from the chat itself.
    check(
        &base(json!({}), json!({"exclude_recursion": true}), true),
        &[("Ann", "apple banana")],
        &["a", "b"],
    );
    // Delayed until recursion: the chat mentions banana, but it may only fire in a recursive pass.
    let delayed = |recursive| base(json!({}), json!({"delay_until_recursion": true}), recursive);
    check(&delayed(true), &[("Ann", "banana")], &[]);
    check(&delayed(false), &[("Ann", "apple banana")], &["a"]);
    let r = check(&delayed(true), &[("Ann", "apple")], &["a", "b"]);
    assert!(matches!(
        fired(&r, "b"),
        FireReason::Recursion { pass: 1, .. }
    ));
}

/// Runs a chat growing one message at a time, carrying the state; returns which lengths fired.
fn timeline(b: &CharacterBook, texts: &[&str]) -> (Vec<bool>, Vec<Run>) {
    let mut state = LoreState::default();
    let mut msgs: Vec<(&str, &str)> = Vec::new();
    let mut fired = Vec::new();
    let mut runs = Vec::new();
    for t in texts {
        msgs.push(("Ann", t));
        let r = run_with(b, &msgs, 1000, &state, 1);
        state = r.state.clone();
        fired.push(!r.uids.is_empty());
        runs.push(r);
    }
    (fired, runs)
}

#[test]
fn sticky_keeps_entry_for_n_messages() {
    let b = entries(
        json!([{"id": 1, "keys": ["key"], "content": "x", "extensions": {"sticky": 2, "scan_depth": 1}}]),
    );
    let (f, runs) = timeline(&b, &["-", "key", "-", "-", "-"]);
    assert_eq!(f, [false, true, true, true, false]);
    assert_eq!(fired(&runs[2], "1"), FireReason::Sticky);
    assert_eq!(
        runs[1].state.effects["1"],
        TimedEffect {
            activated_at: 2,
            sticky_until: 4,
            cooldown_until: 4
        }
    );
}

#[test]
fn cooldown_blocks_for_n_messages() {
    let b = entries(
        json!([{"id": 1, "keys": ["key"], "content": "x", "extensions": {"cooldown": 2, "scan_depth": 1}}]),
    );
    let (f, runs) = timeline(&b, &["key", "key", "key", "key"]);
    assert_eq!(f, [true, false, false, true]);
    assert_eq!(rejected(&runs[1], "1"), RejectReason::Cooldown { until: 3 });
}

#[test]
fn sticky_then_cooldown() {
    let b = entries(
        json!([{"id": 1, "keys": ["key"], "content": "x", "extensions": {"sticky": 1, "cooldown": 1, "scan_depth": 1}}]),
    );
    let (f, _) = timeline(&b, &["key", "key", "key", "key"]);
    assert_eq!(f, [true, true, false, true]);
}

#[test]
fn delay_waits_for_chat_length() {
    let b = entries(
        json!([{"id": 1, "keys": ["key"], "content": "x", "extensions": {"delay": 3, "scan_depth": 1}}]),
    );
    let (f, runs) = timeline(&b, &["key", "key", "key"]);
    assert_eq!(f, [false, false, true]);
    assert_eq!(rejected(&runs[0], "1"), RejectReason::Delay { until: 3 });
}

#[test]
fn rewound_chat_forgets_future_effects() {
    let b =
        entries(json!([{"id": 1, "keys": ["key"], "content": "x", "extensions": {"cooldown": 5}}]));
    let mut state = LoreState::default();
    state.effects.insert(
        "1".into(),
        TimedEffect {
            activated_at: 9,
            sticky_until: 9,
            cooldown_until: 14,
        },
    );
    let r = run_with(&b, &[("Ann", "key")], 1000, &state, 1);
    assert_eq!(r.uids, ["1"]);
}

#[test]
fn positions_map_from_extensions_and_card_field() {
    let b = entries(json!([
        {"id": 0, "keys": ["a"], "content": "x", "position": "after_char"},
        {"id": 1, "keys": ["a"], "content": "x", "position": "after_char", "extensions": {"position": 0}},
        {"id": 2, "keys": ["a"], "content": "x", "extensions": {"position": 1}},
        {"id": 3, "keys": ["a"], "content": "x", "extensions": {"position": 2}},
        {"id": 4, "keys": ["a"], "content": "x", "extensions": {"position": 3}},
        {"id": 5, "keys": ["a"], "content": "x", "extensions": {"position": 4, "depth": 2, "role": 1}},
        {"id": 6, "keys": ["a"], "content": "x", "extensions": {"position": 5}},
        {"id": 7, "keys": ["a"], "content": "x", "extensions": {"position": 6}},
        {"id": 8, "keys": ["a"], "content": "x", "extensions": {"position": 4}},
        {"id": 9, "keys": ["a"], "content": "x"},
    ]));
    let r = run(&b, &[("Ann", "a")]);
    let pos: Vec<Position> = r.report.activated.iter().map(|f| f.position).collect();
    assert_eq!(
        pos,
        [
            Position::After,
            Position::Before,
            Position::After,
            Position::AuthorsNoteTop,
            Position::AuthorsNoteBottom,
            Position::AtDepth {
                depth: 2,
                role: Role::User
            },
            Position::ExamplesTop,
            Position::ExamplesBottom,
            Position::AtDepth {
                depth: 4,
                role: Role::System
            },
            Position::Before,
        ]
    );
}

#[test]
fn output_is_sorted_by_insertion_order() {
    let b = entries(json!([
        {"id": 1, "keys": ["a"], "content": "x", "insertion_order": 300},
        {"id": 2, "keys": ["a"], "content": "x", "insertion_order": 100},
        {"id": 3, "keys": ["a"], "content": "x", "insertion_order": 200},
    ]));
    check(&b, &[("Ann", "a")], &["2", "3", "1"]);
}

#[test]
fn decorators_activate_and_dont_activate() {
    let b = entries(json!([
        {"id": 1, "keys": [], "content": "@@activate\nAlways here."},
        {"id": 2, "keys": ["a"], "content": "@@dont_activate\nNever."},
        {"id": 3, "keys": ["a"], "content": "@@depth 3\n@@activate\nBoth."},
    ]));
    let t = tok();
    let c = CompiledLorebook::compile(&b, &t);
    assert_eq!(c.entry(0).unwrap().content, "Always here.");
    assert_eq!(c.entry(2).unwrap().content, "Both.");
    let r = check(&b, &[("Ann", "a")], &["1", "3"]);
    assert_eq!(fired(&r, "1"), FireReason::Decorator);
    assert_eq!(rejected(&r, "2"), RejectReason::Decorator);
}

#[test]
fn report_serializes_camel_case() {
    let b = entries(
        json!([{"id": 1, "keys": ["a"], "content": "x", "extensions": {"probability": 0}}]),
    );
    let r = run(&b, &[("Ann", "a")]);
    let v = serde_json::to_value(&r.report).unwrap();
    assert_eq!(v["rejected"][0]["reason"]["kind"], "probability");
    assert!(v.get("budgetTokens").is_some());
}

#[test]
fn scan_buffer_is_newest_first() {
    // Anchored at the start of the buffer: only the newest message can be there.
    let b = entries(json!([{"id": 1, "keys": ["/^Ann: newest/"], "content": "x"}]));
    check(&b, &[("Ann", "oldest"), ("Ann", "newest")], &["1"]);
    check(&b, &[("Ann", "newest"), ("Ann", "oldest")], &[]);
}

#[test]
fn compiled_book_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledLorebook>();
    assert_send_sync::<Tokenizer>();
}
