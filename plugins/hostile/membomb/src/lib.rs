//! Hostile test plugin: allocates until the host's memory cap stops it.
use taproom_plugin_sdk::{plugin, BeforeContext, BeforeResult, Plugin};

struct MemBomb;

impl Plugin for MemBomb {
    fn before_generate(_ctx: BeforeContext) -> Result<BeforeResult, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Reserve without filling: growth, not page-touching speed, is what is tested.
            let mut chunk = Vec::<u8>::with_capacity(1 << 20);
            chunk.push(7);
            hoard.push(std::hint::black_box(chunk));
        }
    }
}

plugin!(MemBomb);
