//! How long `fdatasync` takes on this disk for a commit-sized write, issued back to back and
//! issued every 20 ms (the spacing of a 50 QPS benchmark). It is the disk-side half of a
//! durable turn (docs/BENCHMARKS.md, #9): a redb commit writes ~14–23 scattered 4 KiB pages and
//! then syncs them; the turn log (`src/store/turn_log.rs`) appends one record and syncs that.
//!
//! `cargo run --release --example bench_fsync -- [DIR] [ROUNDS]` (DIR defaults to `.`).

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// Pages the writes are spread over (8 MiB): scattered like a B-tree's copy-on-write pages.
const SPAN: usize = 2048;
/// A new conversation's turn log record (three short messages and the conversation), roughly.
const RECORD: usize = 1536;

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".into());
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(250);
    let path = std::path::Path::new(&dir).join("bench_fsync.tmp");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Written out and synced first, so no write below lands in a hole (see src/store/file.rs).
    file.write_all_at(&vec![0u8; PAGE * SPAN], 0)?;
    file.sync_all()?;
    let page = vec![0x5au8; PAGE];
    println!("| written per sync | gap | sync p50 ms | sync p90 ms | sync p99 ms |");
    println!("|---|---|---:|---:|---:|");
    // 0 stands for the turn log's case: one 1.5 KiB record appended after the previous one.
    for pages in [0usize, 1, 5, 10, 20] {
        for gap in [Duration::ZERO, Duration::from_millis(20)] {
            let mut times = Vec::with_capacity(rounds);
            for i in 0..rounds {
                if pages == 0 {
                    let at = (i * RECORD) % (PAGE * SPAN - RECORD);
                    file.write_all_at(&page[..RECORD], at as u64)?;
                }
                for k in 0..pages {
                    let at = (i * 37 + k * 101) % SPAN;
                    file.write_all_at(&page, (at * PAGE) as u64)?;
                }
                let t = Instant::now();
                file.sync_data()?;
                times.push(t.elapsed());
                std::thread::sleep(gap);
            }
            times.sort();
            let q =
                |p: f64| times[((rounds as f64 * p) as usize).min(rounds - 1)].as_secs_f64() * 1e3;
            let gap = if gap.is_zero() {
                "back to back"
            } else {
                "every 20 ms"
            };
            let what = if pages == 0 {
                "one appended record".to_string()
            } else {
                format!("{pages} scattered pages")
            };
            println!(
                "| {what} | {gap} | {:.3} | {:.3} | {:.3} |",
                q(0.5),
                q(0.9),
                q(0.99)
            );
        }
    }
    fs::remove_file(&path)
}
