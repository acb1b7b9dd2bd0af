//! Hostile test plugin: allocates until the host's memory cap stops it.
use taproom_plugin_sdk::{plugin, BeforeContext, BeforeResult, Plugin};

struct MemBomb;

impl Plugin for MemBomb {
    fn before_generate(_ctx: BeforeContext) -> Result<BeforeResult, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(std::hint::black_box(vec![7u8; 1 << 20]));
        }
    }
}

plugin!(MemBomb);
