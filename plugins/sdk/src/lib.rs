//! Taproom plugin SDK: the WIT bindings for `taproom:plugin@0.1.0` plus a `Plugin` trait with
//! do-nothing defaults, so a plugin implements only the hooks it needs.
//!
//! ```ignore
//! use taproom_plugin_sdk::{plugin, BeforeContext, BeforeResult, Plugin};
//!
//! struct Echo;
//! impl Plugin for Echo {
//!     fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
//!         let mut out = taproom_plugin_sdk::unchanged();
//!         if ctx.base.user_message == "/ping" {
//!             out.reply = Some("pong".into());
//!         }
//!         Ok(out)
//!     }
//! }
//! plugin!(Echo);
//! ```

/// Raw wit-bindgen output for the `plugin` world; most plugins only need the re-exports below.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "taproom_plugin_sdk::bindings",
    });
}

pub use bindings::taproom::plugin::types::{
    AfterResult, BeforeContext, BeforeResult, CallContext, Character, HistoryMessage, MemoryEntry,
    PromptMessage, PromptSection, ReplyAction, SectionPosition,
};
pub use serde_json;

/// The host's capabilities: logging, time, a seeded random source and memory.
pub mod host {
    pub use crate::bindings::taproom::plugin::host::{
        log, now_ms, random_u64, recall, remember, Level,
    };

    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    /// A uniformly distributed number in `1..=sides` from the host's seeded source.
    pub fn roll(sides: u32) -> u32 {
        let sides = u64::from(sides.max(1));
        // Rejection sampling keeps the distribution exact for any number of sides.
        let zone = u64::MAX - (u64::MAX % sides);
        loop {
            let v = random_u64();
            if v < zone {
                return (v % sides) as u32 + 1;
            }
        }
    }
}

/// A Taproom plugin. Both hooks default to "change nothing"; the manifest's `hooks` list decides
/// which ones the host actually calls.
pub trait Plugin {
    /// Runs before the upstream is called.
    fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
        let _ = ctx;
        Ok(unchanged())
    }

    /// Runs on the complete generated reply.
    fn after_generate(ctx: CallContext, reply: String) -> Result<AfterResult, String> {
        let _ = (ctx, reply);
        Ok(keep())
    }
}

/// A before-generate result that changes nothing.
pub fn unchanged() -> BeforeResult {
    BeforeResult {
        user_message: None,
        prompt: None,
        sections: Vec::new(),
        state: None,
        reply: None,
    }
}

/// An after-generate result that keeps the reply and the state.
pub fn keep() -> AfterResult {
    AfterResult {
        action: ReplyAction::Keep,
        state: None,
    }
}

/// Parses this character's plugin config; an empty or invalid config reads as `{}`.
pub fn config(ctx: &CallContext) -> serde_json::Value {
    serde_json::from_str(&ctx.config).unwrap_or_else(|_| serde_json::json!({}))
}

/// Parses the per-conversation state into `T`, falling back to `T::default()` when absent or
/// unreadable (e.g. after the plugin changed its state shape).
pub fn state<T: serde::de::DeserializeOwned + Default>(ctx: &CallContext) -> T {
    ctx.state
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Serializes a new state value for a result's `state` field.
pub fn to_state<T: serde::Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

/// Exports a type implementing [`Plugin`] as the component's `before-generate` and
/// `after-generate`.
#[macro_export]
macro_rules! plugin {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __TaproomPluginExport;

        impl $crate::bindings::Guest for __TaproomPluginExport {
            fn before_generate(
                ctx: $crate::BeforeContext,
            ) -> ::core::result::Result<$crate::BeforeResult, ::std::string::String> {
                <$t as $crate::Plugin>::before_generate(ctx)
            }

            fn after_generate(
                ctx: $crate::CallContext,
                reply: ::std::string::String,
            ) -> ::core::result::Result<$crate::AfterResult, ::std::string::String> {
                <$t as $crate::Plugin>::after_generate(ctx, reply)
            }
        }

        $crate::bindings::__export_plugin!(__TaproomPluginExport);
    };
}
