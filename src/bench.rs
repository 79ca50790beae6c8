//! `restfs bench [DIR]`: a quick benchmark of a directory (normally on a
//! RestFS mount): big-file write and read, small-file write, read and
//! stat. Prints throughput, the cost per operation and, on a RestFS
//! mount, what the client did meanwhile (its `restfs.stats` counters).
//!
//! Data is pseudo-random and new on every run, so deduplication does not
//! flatter the write figures. The big file is read after dropping its
//! pages from the kernel's cache (`POSIX_FADV_DONTNEED`), so the read is
//! served by the client, not the page cache.

use crate::fs::metrics::{self, Snapshot};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Directory to benchmark (a scratch subdirectory is made and removed).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Size of the big file, in MiB.
    #[arg(long, default_value_t = 512)]
    pub big_mib: u64,
    /// Number of small files.
    #[arg(long, default_value_t = 1000)]
    pub small_files: u64,
    /// Size of each small file, in KiB.
    #[arg(long, default_value_t = 16)]
    pub small_kib: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured workload.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: &'static str,
    /// Throughput, in `unit`.
    pub value: f64,
    pub unit: &'static str,
    pub seconds: f64,
    /// Average time per operation (per MiB for big files, per file otherwise), in ms.
    pub ms_per_op: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    pub results: Vec<Outcome>,
    /// What the RestFS client did during the run (absent off RestFS).
    pub client: Option<Snapshot>,
}

/// Pseudo-random bytes (xorshift64*), different for every seed.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:<18} [{bar:30}] {pos}/{len} ({per_sec}, {eta})").expect("valid template").progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn outcome(name: &'static str, amount: f64, unit: &'static str, ops: u64, took: Duration) -> Outcome {
    let s = took.as_secs_f64().max(1e-9);
    Outcome { name, value: amount / s, unit, seconds: s, ms_per_op: s * 1000.0 / ops.max(1) as f64 }
}

fn io(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

fn big_file(dir: &Path, a: &BenchArgs, seed: u64, out: &mut Vec<Outcome>) -> Result<(), String> {
    const MIB: usize = 1 << 20;
    let path = dir.join("big");
    let mut buf = vec![0u8; MIB];
    let pb = bar(a.big_mib, "big file write", a.json);
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| io("create", &path, e))?;
    for i in 0..a.big_mib {
        fill(&mut buf, seed ^ i);
        f.write_all(&buf).map_err(|e| io("write", &path, e))?;
        pb.inc(1);
    }
    f.sync_all().map_err(|e| io("fsync", &path, e))?;
    drop(f);
    out.push(outcome("big file write", a.big_mib as f64, "MiB/s", a.big_mib, start.elapsed()));
    pb.finish_and_clear();

    let mut f = std::fs::File::open(&path).map_err(|e| io("open", &path, e))?;
    // SAFETY: plain advice on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let pb = bar(a.big_mib, "big file read", a.json);
    let start = Instant::now();
    for i in 0..a.big_mib {
        f.read_exact(&mut buf).map_err(|e| io("read", &path, e))?;
        let mut want = vec![0u8; 64];
        fill(&mut want, seed ^ i);
        if buf[..64] != want[..] {
            return Err(format!("{}: MiB {i} read back differs from what was written", path.display()));
        }
        pb.inc(1);
    }
    out.push(outcome("big file read", a.big_mib as f64, "MiB/s", a.big_mib, start.elapsed()));
    pb.finish_and_clear();
    std::fs::remove_file(&path).map_err(|e| io("remove", &path, e))
}

fn small_files(dir: &Path, a: &BenchArgs, seed: u64, out: &mut Vec<Outcome>) -> Result<(), String> {
    let n = a.small_files;
    let size = (a.small_kib * 1024) as usize;
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("d{}", i % 10)).join(format!("f{i}"))).collect();
    for d in 0..10.min(n) {
        std::fs::create_dir(dir.join(format!("d{d}"))).map_err(|e| io("mkdir", dir, e))?;
    }
    let mut buf = vec![0u8; size];
    let pb = bar(n, "small file write", a.json);
    let start = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        fill(&mut buf, seed ^ (i as u64) << 20);
        std::fs::write(p, &buf).map_err(|e| io("write", p, e))?;
        pb.inc(1);
    }
    out.push(outcome("small file write", n as f64, "files/s", n, start.elapsed()));
    pb.finish_and_clear();

    let pb = bar(n, "small file read", a.json);
    let start = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        let got = std::fs::read(p).map_err(|e| io("read", p, e))?;
        fill(&mut buf, seed ^ (i as u64) << 20);
        if got != buf {
            return Err(format!("{}: read back differs from what was written", p.display()));
        }
        pb.inc(1);
    }
    out.push(outcome("small file read", n as f64, "files/s", n, start.elapsed()));
    pb.finish_and_clear();

    let pb = bar(n, "stat", a.json);
    let start = Instant::now();
    for p in &paths {
        let m = std::fs::symlink_metadata(p).map_err(|e| io("stat", p, e))?;
        if m.len() != size as u64 {
            return Err(format!("{}: size {} after writing {size}", p.display(), m.len()));
        }
        pb.inc(1);
    }
    out.push(outcome("stat", n as f64, "files/s", n, start.elapsed()));
    pb.finish_and_clear();
    Ok(())
}

/// Run the benchmark; the scratch directory is removed in any case.
pub fn run(a: &BenchArgs) -> Result<Report, String> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let dir = a.dir.join(format!(".restfs-bench-{}-{:x}", std::process::id(), seed & 0xffff));
    std::fs::create_dir(&dir).map_err(|e| io("mkdir", &dir, e))?;
    let before = crate::stats::read(&a.dir).ok();
    let mut results = Vec::new();
    let ran = big_file(&dir, a, seed, &mut results).and_then(|_| small_files(&dir, a, seed, &mut results));
    let after = crate::stats::read(&a.dir).ok();
    let cleaned = std::fs::remove_dir_all(&dir).map_err(|e| io("remove", &dir, e));
    ran?;
    cleaned?;
    let client = before.zip(after).map(|(b, a)| a.since(&b));
    Ok(Report { dir: a.dir.clone(), results, client })
}

pub fn print(r: &Report) {
    println!("{:<18} {:>14} {:>10} {:>14}", "workload", "throughput", "time", "cost");
    for o in &r.results {
        let per = if o.unit == "MiB/s" { "ms/MiB" } else { "ms/file" };
        println!("{:<18} {:>8.1} {:<7} {:>8.2} s {:>8.3} {per}", o.name, o.value, o.unit, o.seconds, o.ms_per_op);
    }
    let Some(c) = &r.client else {
        println!("\n{} is not on a RestFS mount: no client counters", r.dir.display());
        return;
    };
    let get = |k: &str| c.counters.get(k).copied().unwrap_or(0);
    println!("\nclient counters during the run:");
    println!("  blocks fetched       {} ({})", get(metrics::BLOCKS_FETCHED), crate::stats::human_bytes(get(metrics::BYTES_FETCHED)));
    println!(
        "  block cache hits     {} memory, {} disk{}",
        get(metrics::MEMORY_HITS),
        get(metrics::RING_HITS),
        c.cache_hit_rate().map(|h| format!(" ({:.1}% of block reads)", h * 100.0)).unwrap_or_default()
    );
    println!("  blocks uploaded      {} ({})", get(metrics::BLOCKS_UPLOADED), crate::stats::human_bytes(get(metrics::BYTES_UPLOADED)));
    println!(
        "  deduplicated         {} blocks ({})",
        get(metrics::BLOCKS_DEDUPLICATED),
        crate::stats::human_bytes(get(metrics::BYTES_DEDUPLICATED))
    );
    println!("  opens                {} from cache, {} asked the server", get(metrics::OPENS_FROM_CACHE), get(metrics::OPENS_FROM_SERVER));
    let mut ops: Vec<_> = c.ops.iter().collect();
    ops.sort_by_key(|(_, o)| std::cmp::Reverse(o.count));
    let line: Vec<String> =
        ops.iter().take(8).map(|(k, o)| format!("{k} {} ({:.0} µs)", o.count, o.total_us as f64 / o.count.max(1) as f64)).collect();
    println!("  FUSE requests        {}", line.join(", "));
}
