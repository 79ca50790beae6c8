//! Live counters of one mount: requests by operation with their latency,
//! cache hits, bytes up and down, deduplication, uploads in flight.
//!
//! The FUSE adapter serves a JSON snapshot as the extended attribute
//! [`STATS_XATTR`] of any inode of the mount; `restfs stats PATH` and
//! `restfs bench` read it there.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The extended attribute name that returns a [`Snapshot`] as JSON.
pub const STATS_XATTR: &str = "restfs.stats";

// Counter names, as they appear in a snapshot.
pub const BYTES_READ: &str = "bytes_read";
pub const BYTES_WRITTEN: &str = "bytes_written";
pub const MEMORY_HITS: &str = "block_memory_hits";
pub const RING_HITS: &str = "block_disk_cache_hits";
pub const BLOCKS_FETCHED: &str = "blocks_fetched";
pub const BYTES_FETCHED: &str = "bytes_fetched";
pub const BLOCKS_UPLOADED: &str = "blocks_uploaded";
pub const BYTES_UPLOADED: &str = "bytes_uploaded";
pub const BLOCKS_DEDUPLICATED: &str = "blocks_deduplicated";
pub const BYTES_DEDUPLICATED: &str = "bytes_deduplicated";
pub const OPENS_FROM_CACHE: &str = "opens_from_cache";
pub const OPENS_FROM_SERVER: &str = "opens_from_server";
/// Namespace changes and commits answered under the delegation (kept by
/// the delegation itself; added to snapshots).
pub const CHANGES_DELEGATED: &str = "changes_delegated";
/// Blocks the disk cache may not evict now: staged and not yet committed,
/// or being read (taken from the cache itself; added to snapshots).
pub const BLOCKS_PINNED: &str = "blocks_pinned";
/// Names the kernel holds as absent (negative entries) on this mount's word
/// (taken from the core; added to snapshots).
pub const ABSENT_NAMES: &str = "absent_names";

const COUNTERS: &[&str] = &[
    BYTES_READ,
    BYTES_WRITTEN,
    MEMORY_HITS,
    RING_HITS,
    BLOCKS_FETCHED,
    BYTES_FETCHED,
    BLOCKS_UPLOADED,
    BYTES_UPLOADED,
    BLOCKS_DEDUPLICATED,
    BYTES_DEDUPLICATED,
    OPENS_FROM_CACHE,
    OPENS_FROM_SERVER,
];

/// Requests of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    pub count: u64,
    /// Sum of latencies, in microseconds.
    pub total_us: u64,
    pub max_us: u64,
    /// Requests that had to wait (on the server, a lock, a queue): not
    /// answered in place on the FUSE thread.
    #[serde(default)]
    pub waited: u64,
}

/// What `restfs.stats` returns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub ops: BTreeMap<String, OpStats>,
    pub counters: BTreeMap<String, u64>,
    /// Block uploads running now.
    pub uploads_in_flight: i64,
    /// This mount holds the bucket's delegation (write-behind).
    #[serde(default)]
    pub delegated: bool,
    /// Changes answered under the delegation and not yet acknowledged.
    #[serde(default)]
    pub changes_queued: u64,
}

impl Snapshot {
    /// Share of block reads served by the client's caches.
    pub fn cache_hit_rate(&self) -> Option<f64> {
        let get = |k: &str| self.counters.get(k).copied().unwrap_or(0) as f64;
        let hits = get(MEMORY_HITS) + get(RING_HITS);
        let all = hits + get(BLOCKS_FETCHED);
        (all > 0.0).then(|| hits / all)
    }

    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let ops = self
            .ops
            .iter()
            .map(|(k, v)| {
                let e = earlier.ops.get(k).copied().unwrap_or_default();
                (
                    k.clone(),
                    OpStats {
                        count: v.count - e.count.min(v.count),
                        total_us: v.total_us.saturating_sub(e.total_us),
                        max_us: v.max_us,
                        waited: v.waited.saturating_sub(e.waited),
                    },
                )
            })
            .filter(|(_, v)| v.count > 0)
            .collect();
        let counters =
            self.counters.iter().map(|(k, v)| (k.clone(), v.saturating_sub(earlier.counters.get(k).copied().unwrap_or(0)))).collect();
        Snapshot { ops, counters, ..self.clone() }
    }
}

pub struct Metrics {
    counters: Vec<AtomicU64>,
    ops: Mutex<BTreeMap<&'static str, OpStats>>,
    uploads: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics { counters: COUNTERS.iter().map(|_| AtomicU64::new(0)).collect(), ops: Mutex::default(), uploads: AtomicI64::new(0) }
    }
}

impl Metrics {
    /// Add `n` to counter `name` (one of the constants above).
    pub fn add(&self, name: &str, n: u64) {
        match COUNTERS.iter().position(|c| *c == name) {
            Some(i) => {
                self.counters[i].fetch_add(n, Ordering::Relaxed);
            }
            None => debug_assert!(false, "unknown counter {name}"),
        }
    }

    /// One request of operation `op` took `took` (and had to wait).
    pub fn request(&self, op: &'static str, took: Duration, waited: bool) {
        let us = took.as_micros() as u64;
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let s = ops.entry(op).or_default();
        s.count += 1;
        s.waited += u64::from(waited);
        s.total_us += us;
        s.max_us = s.max_us.max(us);
    }

    /// An upload started (+1) or ended (-1).
    pub fn uploads(&self, delta: i64) {
        self.uploads.fetch_add(delta, Ordering::Relaxed);
    }

    /// Upload tasks under way across the mount.
    pub fn uploads_in_flight(&self) -> i64 {
        self.uploads.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            ops: self.ops.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            counters: COUNTERS.iter().zip(&self.counters).map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed))).collect(),
            uploads_in_flight: self.uploads.load(Ordering::Relaxed),
            delegated: false,
            changes_queued: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_count_and_subtract() {
        let m = Metrics::default();
        m.add(BLOCKS_FETCHED, 1);
        m.add(MEMORY_HITS, 3);
        m.request("read", Duration::from_micros(10), false);
        let a = m.snapshot();
        m.request("read", Duration::from_micros(30), true);
        m.add(BYTES_READ, 4096);
        let b = m.snapshot();
        assert_eq!(a.cache_hit_rate(), Some(0.75));
        let d = b.since(&a);
        assert_eq!(d.ops["read"], OpStats { count: 1, total_us: 30, max_us: 30, waited: 1 });
        assert_eq!(d.counters[BYTES_READ], 4096);
        assert_eq!(d.counters[MEMORY_HITS], 0);
        let json = serde_json::to_string(&b).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ops["read"].count, 2);
    }
}
