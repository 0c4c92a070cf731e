//! Benchmark: how long a slot flip takes, the atomic switch at the heart of
//! every install and revert (a new symlink, `rename(2)` over `current`, fsync
//! of the directory). Runs on the disk under `target/bench/flip`, not tmpfs,
//! so the fsync is real.
//!
//! `cargo run --release -p turnout-agent --example flip_latency [FLIPS]`

use std::time::{Duration, Instant};

use turnout_agent::slots::{ServiceDir, Slot};

fn main() -> std::io::Result<()> {
    let flips: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let root = std::path::Path::new("target/bench/flip");
    let _ = std::fs::remove_dir_all(root);
    let dir = ServiceDir::open(root, "web")?;
    for slot in [Slot::Blue, Slot::Green] {
        std::fs::create_dir_all(dir.slot_path(slot))?;
    }
    let mut times: Vec<Duration> = Vec::with_capacity(flips);
    for i in 0..flips {
        let slot = if i % 2 == 0 { Slot::Blue } else { Slot::Green };
        let started = Instant::now();
        dir.point(slot)?;
        times.push(started.elapsed());
        assert_eq!(dir.active(), Some(slot));
    }
    times.sort();
    let at = |q: f64| {
        times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "{flips} flips: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(0.50),
        at(0.99),
        times.last().unwrap().as_secs_f64() * 1000.0
    );
    Ok(())
}
