//! Hostile test plugin: returns far more output than the host accepts.
use taproom_plugin_sdk::{
    keep, plugin, unchanged, AfterResult, BeforeContext, BeforeResult, CallContext, Plugin,
    ReplyAction,
};

struct Huge;

impl Plugin for Huge {
    fn before_generate(_ctx: BeforeContext) -> Result<BeforeResult, String> {
        let mut out = unchanged();
        out.reply = Some("x".repeat(4 << 20));
        Ok(out)
    }

    fn after_generate(_ctx: CallContext, _reply: String) -> Result<AfterResult, String> {
        let mut out = keep();
        out.state = Some(format!("\"{}\"", "s".repeat(1 << 20)));
        out.action = ReplyAction::Rewrite("ok".into());
        Ok(out)
    }
}

plugin!(Huge);
