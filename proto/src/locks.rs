//! A table of byte-range locks with POSIX semantics, kept by restfsd for
//! every client and by each client for its own locks. A holder's locks on
//! one file never overlap: taking a range replaces whatever the holder had
//! there, splitting its locks at the edges; locks of different holders
//! conflict when they overlap and either is a write lock.

use crate::methods::LockKind;
use std::collections::HashMap;
use std::hash::Hash;

/// One lock: its holder, its bytes (`end` inclusive) and its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<H> {
    pub by: H,
    pub start: u64,
    pub end: u64,
    pub write: bool,
    pub pid: u32,
}

impl<H> Held<H> {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    pub fn kind(&self) -> LockKind {
        if self.write { LockKind::Write } else { LockKind::Read }
    }
}

/// Locks per file `K`, held by holders `H`.
#[derive(Debug)]
pub struct LockTable<K, H> {
    files: HashMap<K, Vec<Held<H>>>,
}

impl<K, H> Default for LockTable<K, H> {
    fn default() -> Self {
        LockTable { files: HashMap::new() }
    }
}

impl<K: Hash + Eq + Copy, H: Eq + Copy> LockTable<K, H> {
    /// The first lock of another holder that a lock of `by` over
    /// `start..=end` (a write lock if `write`) would conflict with.
    pub fn conflict(&self, file: K, by: H, start: u64, end: u64, write: bool) -> Option<&Held<H>> {
        self.files.get(&file)?.iter().find(|h| h.by != by && (write || h.write) && h.overlaps(start, end))
    }

    /// Take, change (`Read`, `Write`) or drop (`Unlock`) `start..=end` for
    /// `by`; `false` when another holder's lock conflicts (nothing changes).
    pub fn set(&mut self, file: K, by: H, start: u64, end: u64, kind: LockKind, pid: u32) -> bool {
        let write = kind == LockKind::Write;
        if kind != LockKind::Unlock && self.conflict(file, by, start, end, write).is_some() {
            return false;
        }
        let held = self.files.entry(file).or_default();
        let mut kept = Vec::with_capacity(held.len() + 2);
        for h in held.drain(..) {
            if h.by != by || !h.overlaps(start, end) {
                kept.push(h);
                continue;
            }
            // What lies outside the range stays.
            if h.start < start {
                kept.push(Held { end: start - 1, ..h.clone() });
            }
            if h.end > end {
                kept.push(Held { start: end + 1, ..h });
            }
        }
        if kind != LockKind::Unlock {
            kept.push(Held { by, start, end, write, pid });
        }
        if kept.is_empty() {
            self.files.remove(&file);
        } else {
            *held = kept;
        }
        true
    }

    /// Drop every lock of the holders `gone` says are gone.
    pub fn drop_holders(&mut self, gone: impl Fn(&H) -> bool) {
        self.files.retain(|_, held| {
            held.retain(|h| !gone(&h.by));
            !held.is_empty()
        });
    }

    /// Hand the locks of each holder `to` names a new holder for to that
    /// holder (which must hold none yet).
    pub fn move_holders(&mut self, to: impl Fn(&H) -> Option<H>) {
        for h in self.files.values_mut().flatten() {
            if let Some(new) = to(&h.by) {
                h.by = new;
            }
        }
    }

    /// Every lock, with its file.
    pub fn all(&self) -> impl Iterator<Item = (K, &Held<H>)> {
        self.files.iter().flat_map(|(k, held)| held.iter().map(move |h| (*k, h)))
    }

    /// Whether `by` holds any lock on `file`.
    pub fn holds(&self, file: K, by: H) -> bool {
        self.files.get(&file).is_some_and(|held| held.iter().any(|h| h.by == by))
    }

    pub fn len(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockKind::*;

    /// Holders are (connection, owner).
    type Table = LockTable<u64, (u64, i64)>;

    #[test]
    fn readers_share_and_a_writer_excludes() {
        let mut l = Table::default();
        assert!(l.set(5, (1, 1), 0, 99, Read, 42));
        assert!(l.set(5, (2, 1), 50, 149, Read, 42));
        assert!(!l.set(5, (2, 1), 90, 95, Write, 42), "overlaps another holder's read lock");
        assert!(l.set(5, (2, 1), 100, 200, Write, 42), "only its own read lock is there");
        assert!(!l.set(5, (1, 2), 0, 0, Write, 42), "another owner on the same connection is another holder");
        assert!(l.set(6, (3, 1), 0, 0, Write, 42), "another file");
        let seen = l.conflict(5, (3, 1), 150, 150, false).unwrap();
        assert_eq!((seen.start, seen.end, seen.kind(), seen.by), (100, 200, Write, (2, 1)));
    }

    #[test]
    fn a_range_taken_again_or_unlocked_splits_the_holders_locks() {
        let mut l = Table::default();
        let all = i64::MAX as u64;
        assert!(l.set(5, (1, 1), 0, all, Write, 1));
        assert!(l.set(5, (1, 1), 10, 19, Unlock, 1));
        assert!(l.set(5, (2, 1), 10, 19, Write, 2), "the hole is free");
        assert!(!l.set(5, (2, 1), 9, 9, Read, 2));
        assert!(!l.set(5, (2, 1), 20, 20, Read, 2));
        assert!(l.set(5, (1, 1), 100, 199, Read, 1), "a downgrade in the middle");
        assert!(l.set(5, (3, 1), 150, 160, Read, 3));
        assert!(!l.set(5, (3, 1), 200, 200, Read, 3), "the write lock goes on past it");
        assert_eq!(l.len(), 6);
        assert!(l.holds(5, (1, 1)) && !l.holds(5, (9, 9)));
        l.drop_holders(|h| h.0 == 1);
        assert!(l.set(5, (3, 1), 0, all, Unlock, 3));
        assert_eq!(l.len(), 1);
        assert!(l.set(5, (4, 1), 0, 9, Write, 4));
        assert!(l.set(5, (2, 1), 0, all, Unlock, 2) && l.set(5, (4, 1), 0, all, Unlock, 4));
        assert!(l.is_empty());
    }
}
