//! Hostile test plugin: calls every host import in an endless loop.
use taproom_plugin_sdk::{host, plugin, BeforeContext, BeforeResult, MemoryEntry, Plugin};

struct Chatty;

impl Plugin for Chatty {
    fn before_generate(_ctx: BeforeContext) -> Result<BeforeResult, String> {
        let mut i: u64 = 0;
        loop {
            i += 1;
            host::log(host::Level::Info, &format!("chatty line {i}"));
            std::hint::black_box(host::now_ms());
            std::hint::black_box(host::random_u64());
            std::hint::black_box(host::recall("anything", 5));
            host::remember(&MemoryEntry {
                content: format!("memory {i}"),
                kind: "fact".into(),
                importance: 0.5,
                tags: Vec::new(),
            });
        }
    }
}

plugin!(Chatty);
