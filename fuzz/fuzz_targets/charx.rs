//! Any bytes through the CharX reader (and the format sniffing in front of it): no panic, no
//! allocation past the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taproom::cards::{self, CardLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits so a lying header cannot make one iteration slow.
    let limits = CardLimits {
        max_uncompressed_bytes: 1 << 20,
        ..CardLimits::default()
    };
    let _ = cards::charx::read(data, &limits);
    let _ = cards::import_card(data, &limits);
});
