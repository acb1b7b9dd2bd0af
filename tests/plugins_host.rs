//! The plugin host, exercised directly: each example plugin's behaviour, hostile plugins bounded
//! by their limits while other calls keep working, failure policies, the cool-down breaker, the
//! state cap and reload.

#[path = "support/plugins.rs"]
mod plugins_support;

use std::sync::Arc;
use std::time::Duration;

use plugins_support::{PluginsDir, AFTER, BEFORE, BOTH};
use serde_json::json;
use taproom::plugins::{
    spawn_watcher, BeforeContext, Binding, CallContext, FailureKind, FailurePolicy, HistoryMessage,
    PluginCharacter, PluginHost, PluginsConfig, PromptMessage, RecallFn, ReplyAction,
    SectionPosition,
};

fn config(dir: &PluginsDir) -> PluginsConfig {
    PluginsConfig {
        dir: dir.path().to_path_buf(),
        watch: false,
        ..PluginsConfig::default()
    }
}

fn host(dir: &PluginsDir, cfg: PluginsConfig) -> Arc<PluginHost> {
    let _ = dir;
    PluginHost::load(&cfg).unwrap_or_else(|e| panic!("load: {e}"))
}

fn binding(name: &str, config: serde_json::Value) -> Binding {
    Binding {
        name: name.into(),
        config,
    }
}

fn base(message: &str, seed: u64) -> CallContext {
    CallContext {
        conversation_id: "conv-1".into(),
        character: PluginCharacter {
            id: "char-1".into(),
            name: "Seraphina".into(),
            description: "A guardian of the forest".into(),
            personality: "kind".into(),
            scenario: "a glade".into(),
            first_mes: "Hello, traveler.".into(),
            tags: vec!["fantasy".into()],
        },
        user_name: "Ann".into(),
        user_message: message.into(),
        history: vec![HistoryMessage {
            role: "assistant".into(),
            name: Some("Seraphina".into()),
            content: "Hello, traveler.".into(),
        }],
        state: None,
        seed,
        recall: None,
    }
}

fn before(message: &str, seed: u64) -> BeforeContext {
    BeforeContext {
        base: base(message, seed),
        prompt: vec![
            PromptMessage {
                role: "system".into(),
                content: "You are Seraphina.".into(),
            },
            PromptMessage {
                role: "user".into(),
                content: message.into(),
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dice_roll_command_short_circuits_with_a_reproducible_reply() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "");
    let host = host(&dir, config(&dir));
    let b = binding("dice", json!({}));
    let out = host.before_generate(&b, &before("/roll 2d6+1", 7)).await;
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    let reply = out.reply.unwrap_or_default();
    assert!(reply.starts_with("🎲 2d6+1: ["), "{reply}");
    let total: i64 = reply
        .rsplit("= ")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(-1);
    assert!((3..=13).contains(&total), "{reply}");
    assert!(out.user_message.is_none() && out.prompt.is_none());

    let again = host.before_generate(&b, &before("/roll 2d6+1", 7)).await;
    assert_eq!(
        again.ok().and_then(|o| o.reply),
        Some(reply.clone()),
        "same seed, same roll"
    );

    let bad = host.before_generate(&b, &before("/roll 0d6", 1)).await;
    let bad = bad.ok().and_then(|o| o.reply).unwrap_or_default();
    assert!(bad.contains("cannot roll"), "{bad}");

    // Only our host interface plus wasi interfaces that std links in (stubbed to trap).
    let imports = host.imports("dice").unwrap_or_default();
    assert!(
        imports.iter().any(|i| i == "taproom:plugin/host@0.1.0"),
        "{imports:?}"
    );
    assert!(imports
        .iter()
        .all(|i| i.starts_with("taproom:plugin/") || i.starts_with("wasi:")));
    eprintln!("dice component imports: {imports:?}");

    let plain = host.before_generate(&b, &before("hello there", 1)).await;
    assert_eq!(
        plain.ok().map(|o| (o.reply, o.user_message)),
        Some((None, None))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dice_expands_roll_placeholders_and_respects_config_limits() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "");
    let host = host(&dir, config(&dir));
    let b = binding("dice", json!({"maxDice": 3}));
    let out = host
        .before_generate(
            &b,
            &before("I attack! {{roll:1d20+5}} damage {{roll:2d4}}", 3),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let msg = out.user_message.unwrap_or_default();
    assert!(
        msg.starts_with("I attack! ") && !msg.contains("{{roll"),
        "{msg}"
    );
    let numbers: Vec<i64> = msg
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{msg}");
    assert!(
        (6..=25).contains(&numbers[0]) && (2..=8).contains(&numbers[1]),
        "{msg}"
    );
    let capped = host.before_generate(&b, &before("/roll 4d6", 3)).await;
    assert!(capped
        .ok()
        .and_then(|o| o.reply)
        .unwrap_or_default()
        .contains("1 and 3 dice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mood_tracker_keeps_state_adds_a_prompt_line_and_remembers_changes() {
    let dir = PluginsDir::new();
    dir.add("mood", "taproom_plugin_mood", BEFORE, "fail-open", "");
    let host = host(&dir, config(&dir));
    let b = binding("mood", json!({"step": 10, "depth": 1}));

    let first = host
        .before_generate(&b, &before("thank you, that was kind", 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let state = first.state.clone().unwrap_or_default();
    let parsed: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
    assert_eq!(parsed["affection"], 20, "{state}");
    assert_eq!(first.sections.len(), 1);
    let section = &first.sections[0];
    assert_eq!(section.role, "system");
    assert_eq!(section.position, SectionPosition::Depth(1));
    assert!(
        section.content.contains("friendly (affection 20/100)"),
        "{}",
        section.content
    );
    assert_eq!(first.memories.len(), 1, "neutral -> friendly is remembered");
    assert!(first.memories[0].content.contains("became friendly"));

    // The caller hands the state back next turn.
    let mut next = before("you are stupid and boring", 2);
    next.base.state = first.state;
    let second = host
        .before_generate(&b, &next)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed: serde_json::Value =
        serde_json::from_str(&second.state.unwrap_or_default()).unwrap_or_default();
    assert_eq!(parsed["affection"], 0);
    assert_eq!(parsed["turns"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mood_tracker_starts_a_new_conversation_from_recalled_memory() {
    let dir = PluginsDir::new();
    dir.add("mood", "taproom_plugin_mood", BEFORE, "fail-open", "");
    let host = host(&dir, config(&dir));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, u32)>::new()));
    let log = seen.clone();
    let recall: RecallFn = Arc::new(move |query: &str, limit: u32| {
        if let Ok(mut l) = log.lock() {
            l.push((query.to_string(), limit));
        }
        vec!["Seraphina's feelings toward Ann became affectionate.".to_string()]
    });
    let mut ctx = before("hello", 1);
    ctx.base.recall = Some(recall);
    let out = host
        .before_generate(&binding("mood", json!(null)), &ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.sections[0]
        .content
        .contains("affectionate (affection 60/100)"));
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        vec![("Seraphina's feelings toward Ann".to_string(), 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rewrites_and_vetoes_replies_by_configured_rules() {
    let dir = PluginsDir::new();
    let schema = r#"
[config-schema]
type = "object"
required = ["rules"]
properties.maxChars = { type = "integer", minimum = 1 }
properties.rules = { type = "array", items = { type = "object", required = ["match"], properties.action = { enum = ["rewrite", "veto"] } } }
"#;
    dir.add(
        "guard",
        "taproom_plugin_guard",
        AFTER,
        "fail-closed",
        schema,
    );
    let host = host(&dir, config(&dir));
    let cfg = json!({"rules": [
        {"match": "darn", "action": "rewrite", "replacement": "d***"},
        {"match": "secret plan", "action": "veto", "reason": "the reply revealed the plot"}
    ]});
    assert!(host.validate_binding("guard", &cfg).is_ok());
    let bad = host.validate_binding(
        "guard",
        &json!({"rules": [{"match": "x", "action": "nuke"}]}),
    );
    assert!(bad.unwrap_err().contains("$.rules[0].action"));
    assert!(host.validate_binding("nope", &cfg).is_err());

    let b = binding("guard", cfg);
    let ctx = base("hi", 1);
    let rewritten = host.after_generate(&b, &ctx, "Darn it, darn!").await;
    assert_eq!(
        rewritten.map(|o| o.action).ok(),
        Some(ReplyAction::Rewrite("d*** it, d***!".into()))
    );
    let vetoed = host
        .after_generate(&b, &ctx, "Our SECRET PLAN is...")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        vetoed.action,
        ReplyAction::Veto("the reply revealed the plot".into())
    );
    // The plugin's host::warn line comes back with the outcome.
    assert_eq!(vetoed.logs.len(), 1);
    assert_eq!(vetoed.logs[0].level, taproom::plugins::LogLevel::Warn);
    assert!(vetoed.logs[0].message.contains("vetoed a reply"));
    let kept = host.after_generate(&b, &ctx, "All is well.").await;
    assert_eq!(kept.map(|o| o.action).ok(), Some(ReplyAction::Keep));
    // Guard declares only after-generate: before-generate is a no-op, not a call.
    let noop = host.before_generate(&b, &before("x", 1)).await;
    assert_eq!(noop.ok(), Some(Default::default()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_bounded_while_other_calls_keep_working() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "")
        .add("spin", "taproom_hostile_spin", BEFORE, "fail-open", "")
        .add(
            "membomb",
            "taproom_hostile_membomb",
            BEFORE,
            "fail-open",
            "",
        )
        .add("trap", "taproom_hostile_trap", BOTH, "fail-open", "")
        .add("huge", "taproom_hostile_huge", BOTH, "fail-open", "")
        .add("chatty", "taproom_hostile_chatty", BEFORE, "fail-open", "");
    let cfg = PluginsConfig {
        failure_threshold: 100,
        // Above the 50 ms default: `huge` must get to write its output even while `spin` and
        // `membomb` hold both cores of a CI machine (at 50 ms it sometimes timed out first).
        timeout_ms: 250,
        ..config(&dir)
    };
    let host = host(&dir, cfg);
    let started = tokio::time::Instant::now();
    let mut hostile = Vec::new();
    for name in ["spin", "membomb", "trap", "huge", "chatty"] {
        let host = host.clone();
        hostile.push(tokio::spawn(async move {
            let t = tokio::time::Instant::now();
            let r = host
                .before_generate(&binding(name, json!({})), &before("go", 1))
                .await;
            (name, r, t.elapsed())
        }));
    }
    // Normal calls meanwhile.
    let mut normal = Vec::new();
    for i in 0..20 {
        let host = host.clone();
        normal.push(tokio::spawn(async move {
            host.before_generate(&binding("dice", json!({})), &before("/roll d20", i))
                .await
        }));
    }
    for n in normal {
        let r = n.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(r.map(|o| o.reply.is_some()).unwrap_or(false));
    }
    for h in hostile {
        let (name, r, took) = h.await.unwrap_or_else(|e| panic!("{e}"));
        let f = match r {
            Ok(o) => panic!("{name} succeeded: {o:?}"),
            Err(f) => f,
        };
        let want = match name {
            "spin" | "chatty" => FailureKind::Timeout,
            "membomb" => FailureKind::MemoryLimit,
            "trap" => FailureKind::Trap,
            _ => FailureKind::OutputTooLarge,
        };
        assert_eq!(f.kind, want, "{name}: {f}");
        assert_eq!(f.plugin, name);
        assert_eq!(f.policy, FailurePolicy::FailOpen);
        // 250 ms budget; generous slack for a loaded 2-core machine.
        assert!(took < Duration::from_secs(2), "{name} took {took:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let huge_after = host
        .after_generate(&binding("huge", json!({})), &base("x", 1), "r")
        .await;
    assert_eq!(
        huge_after.err().map(|f| f.kind),
        Some(FailureKind::OutputTooLarge)
    );
    let trap_after = host
        .after_generate(&binding("trap", json!({})), &base("x", 1), "r")
        .await;
    assert_eq!(trap_after.err().map(|f| f.kind), Some(FailureKind::Trap));

    let stats = host.stats();
    let get = |n: &str| stats.iter().find(|s| s.name == n).cloned();
    let spin = get("spin").unwrap_or_else(|| panic!("no spin stats"));
    assert_eq!((spin.calls, spin.failures, spin.timeouts), (1, 1, 1));
    assert!(spin.p50_us >= 40_000, "spin ran {} µs", spin.p50_us);
    let trap = get("trap").unwrap_or_else(|| panic!("no trap stats"));
    assert_eq!(trap.traps, 2);
    let dice = get("dice").unwrap_or_else(|| panic!("no dice stats"));
    assert_eq!((dice.calls, dice.failures), (20, 0));
    assert!(dice.p99_us >= dice.p50_us && dice.p50_us > 0);
    assert_eq!(dice.version, "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policy_is_reported_for_the_caller_to_apply() {
    let dir = PluginsDir::new();
    dir.add("open", "taproom_hostile_trap", BEFORE, "fail-open", "")
        .add("closed", "taproom_hostile_trap", BEFORE, "fail-closed", "");
    let host = host(&dir, config(&dir));
    let open = host
        .before_generate(&binding("open", json!({})), &before("x", 1))
        .await;
    let open = open.err().unwrap_or_else(|| panic!("open succeeded"));
    assert!(open.is_fail_open());
    let closed = host
        .before_generate(&binding("closed", json!({})), &before("x", 1))
        .await;
    let closed = closed.err().unwrap_or_else(|| panic!("closed succeeded"));
    assert!(!closed.is_fail_open());
    assert_eq!(closed.kind, FailureKind::Trap);
    // The panic path of Rust's std reads the environment through WASI, which plugins are denied;
    // either way the call ends as a trap with a readable message.
    assert!(
        !closed.message.is_empty() && !closed.message.contains("backtrace"),
        "{}",
        closed.message
    );
    assert_eq!(closed.hook, "before-generate");
    assert_eq!(
        (
            taproom::plugins::PluginFailure::CODE,
            taproom::plugins::PluginFailure::STATUS
        ),
        ("PLUGIN_FAILED", 502)
    );
    let missing = host
        .before_generate(&binding("gone", json!({})), &before("x", 1))
        .await;
    assert_eq!(
        missing.err().map(|f| (f.kind, f.is_fail_open())),
        Some((FailureKind::NotFound, true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_disable_a_plugin_for_the_cooldown() {
    let dir = PluginsDir::new();
    dir.add("trap", "taproom_hostile_trap", BEFORE, "fail-open", "");
    let cfg = PluginsConfig {
        failure_threshold: 2,
        cooldown_ms: 300,
        ..config(&dir)
    };
    let host = host(&dir, cfg);
    let b = binding("trap", json!({}));
    for _ in 0..2 {
        let r = host.before_generate(&b, &before("x", 1)).await;
        assert_eq!(r.err().map(|f| f.kind), Some(FailureKind::Trap));
    }
    let r = host.before_generate(&b, &before("x", 1)).await;
    assert_eq!(r.err().map(|f| f.kind), Some(FailureKind::Disabled));
    let stats = host.stats();
    assert!(stats[0].disabled_until.is_some());
    assert_eq!(
        (stats[0].calls, stats[0].traps),
        (3, 2),
        "the refused call did not run"
    );
    // The cool-down is wall-clock time by design; wait it out.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = host.before_generate(&b, &before("x", 1)).await;
    assert_eq!(
        r.err().map(|f| f.kind),
        Some(FailureKind::Trap),
        "a trial call runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_larger_than_the_cap_is_rejected() {
    let dir = PluginsDir::new();
    dir.add(
        "mood",
        "taproom_plugin_mood",
        BEFORE,
        "fail-closed",
        "[limits]\nmax-state-bytes = 8",
    );
    let host = host(&dir, config(&dir));
    let r = host
        .before_generate(&binding("mood", json!({})), &before("hi", 1))
        .await;
    let f = r.err().unwrap_or_else(|| panic!("state cap not enforced"));
    assert_eq!(f.kind, FailureKind::OutputTooLarge);
    assert!(f.message.contains("state"), "{}", f.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dir_means_no_plugins_and_bad_manifests_fail_loading() {
    let dir = PluginsDir::new();
    let cfg = PluginsConfig {
        dir: dir.path().join("absent"),
        ..config(&dir)
    };
    let host = host(&dir, cfg);
    assert!(host.names().is_empty() && host.stats().is_empty());

    dir.install(
        "broken",
        "taproom_plugin_dice",
        "name = \"Broken!\"\nversion = \"1\"\nhooks = [\"before-generate\"]",
    );
    assert!(PluginHost::load(&config(&dir)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_versions_without_dropping_calls_in_flight() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "")
        .add("slow", "taproom_hostile_chatty", BEFORE, "fail-open", "");
    let host = host(&dir, config(&dir));
    assert_eq!(host.names(), vec!["dice".to_string(), "slow".to_string()]);

    // A call in flight on the old set: the chatty plugin calls `recall` in a loop, which tells
    // us it is running.
    let (running_tx, mut running) = tokio::sync::mpsc::unbounded_channel::<()>();
    let recall: RecallFn = Arc::new(move |_: &str, _: u32| {
        let _ = running_tx.send(());
        Vec::new()
    });
    let inflight = {
        let host = host.clone();
        let mut ctx = before("x", 1);
        ctx.base.recall = Some(recall);
        tokio::spawn(async move {
            host.before_generate(&binding("slow", json!({})), &ctx)
                .await
        })
    };
    running
        .recv()
        .await
        .unwrap_or_else(|| panic!("the slow call never started"));
    let manifest = "name = \"dice\"\nversion = \"2.0.0\"\nhooks = [\"before-generate\"]\n";
    std::fs::write(dir.path().join("dice/plugin.toml"), manifest).unwrap_or_else(|e| panic!("{e}"));
    std::fs::remove_dir_all(dir.path().join("slow")).unwrap_or_else(|e| panic!("{e}"));
    let reloader = host.clone();
    tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        host.manifest("dice").map(|m| m.version),
        Some("2.0.0".into())
    );
    assert_eq!(host.names(), vec!["dice".to_string()]);
    // The in-flight call finished on the set it started with (its own deadline ended it).
    let r = inflight.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.err().map(|f| f.kind), Some(FailureKind::Timeout));
    let ok = host
        .before_generate(&binding("dice", json!({})), &before("/roll d6", 1))
        .await;
    assert!(ok.map(|o| o.reply.is_some()).unwrap_or(false));

    // A broken reload keeps the current set.
    std::fs::write(dir.path().join("dice/plugin.toml"), "name = 3")
        .unwrap_or_else(|e| panic!("{e}"));
    let reloader = host.clone();
    let failed = tokio::task::spawn_blocking(move || reloader.reload()).await;
    assert!(matches!(failed, Ok(Err(_))));
    assert_eq!(
        host.manifest("dice").map(|m| m.version),
        Some("2.0.0".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reloads_when_a_plugin_file_changes() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "");
    let cfg = PluginsConfig {
        watch: true,
        watch_interval_ms: 100,
        ..config(&dir)
    };
    let host = host(&dir, cfg);
    let watcher = spawn_watcher(&host).unwrap_or_else(|| panic!("watch is on"));
    dir.add("guard", "taproom_plugin_guard", AFTER, "fail-open", "");
    // Poll the observable effect with a bounded wait instead of a fixed sleep.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while host.manifest("guard").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host.names(), vec!["dice".to_string(), "guard".to_string()]);
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_instance_pool_wait_for_a_slot_instead_of_failing() {
    let dir = PluginsDir::new();
    dir.add("dice", "taproom_plugin_dice", BEFORE, "fail-open", "");
    let cfg = PluginsConfig {
        max_concurrent_instances: 2,
        ..config(&dir)
    };
    let host = host(&dir, cfg);
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                host.before_generate(&binding("dice", json!({})), &before("/roll 3d8", i))
                    .await
            })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(r.map(|o| o.reply.is_some()).unwrap_or(false));
    }
    assert_eq!(host.stats()[0].failures, 0);
}
