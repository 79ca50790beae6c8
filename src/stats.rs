//! `restfs stats PATH`: the live counters of the mount holding PATH, read
//! from its `restfs.stats` extended attribute (see [`crate::fs::metrics`]).

use crate::fs::metrics::{self, STATS_XATTR, Snapshot};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The counters of the RestFS mount holding `path`.
pub fn read(path: &Path) -> Result<Snapshot, String> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: invalid path", path.display()))?;
    let name = CString::new(STATS_XATTR).expect("no NUL in the name");
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: valid C strings and a buffer of the length passed.
        let n = unsafe { libc::getxattr(cpath.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Err(format!("{} is not on a RestFS mount", path.display())),
            _ => return Err(format!("{}: {e}", path.display())),
        }
    }
    serde_json::from_slice(&buf).map_err(|e| format!("{}: unreadable counters: {e}", path.display()))
}

/// Print a snapshot as a table.
pub fn print(s: &Snapshot) {
    println!("{:<14} {:>10} {:>12} {:>12} {:>8}", "operation", "requests", "avg latency", "max latency", "waited");
    let mut ops: Vec<_> = s.ops.iter().collect();
    ops.sort_by_key(|(_, o)| std::cmp::Reverse(o.count));
    for (op, o) in ops {
        let avg = o.total_us as f64 / o.count.max(1) as f64;
        println!("{op:<14} {:>10} {:>9.1} µs {:>9} µs {:>8}", o.count, avg, o.max_us, o.waited);
    }
    println!();
    for (k, v) in &s.counters {
        println!("{k:<24} {v}");
    }
    let hit = s.cache_hit_rate().map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into());
    println!("{:<24} {hit}", "block_cache_hit_rate");
    println!("{:<24} {}", "uploads_in_flight", s.uploads_in_flight);
    println!("{:<24} {} ({} changes queued)", "delegated", if s.delegated { "yes" } else { "no" }, s.changes_queued);
    let up = s.counters.get(metrics::BYTES_UPLOADED).copied().unwrap_or(0);
    let down = s.counters.get(metrics::BYTES_FETCHED).copied().unwrap_or(0);
    println!("{:<24} {} up, {} down", "network", human_bytes(up), human_bytes(down));
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}
