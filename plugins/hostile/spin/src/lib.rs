//! Hostile test plugin: never returns (bounded only by the host's deadline).
use taproom_plugin_sdk::{plugin, BeforeContext, BeforeResult, Plugin};

struct Spin;

impl Plugin for Spin {
    fn before_generate(ctx: BeforeContext) -> Result<BeforeResult, String> {
        let mut n: u64 = ctx.base.user_message.len() as u64;
        loop {
            // Volatile-ish work so the optimizer cannot prove the loop empty.
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

plugin!(Spin);
