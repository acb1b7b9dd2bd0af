//! Hostile test plugin: panics (a wasm trap) in both hooks.
use taproom_plugin_sdk::{plugin, AfterResult, BeforeContext, BeforeResult, CallContext, Plugin};

struct Trap;

impl Plugin for Trap {
    fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
        panic!("trap plugin refuses {}", ctx.base.user_message);
    }

    fn after_generate(_ctx: CallContext, reply: String) -> Result<AfterResult, String> {
        panic!("trap plugin refuses {reply}");
    }
}

plugin!(Trap);
