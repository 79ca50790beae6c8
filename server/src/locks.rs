//! Byte-range locks held for clients (`fcntl` locks, and `flock` as
//! whole-file locks, as NFS does), in memory. A holder is one connection
//! and an owner that client names; its locks go with the connection.
//!
//! Across a restart, the clients take their locks again (reclaims). So
//! that nobody else takes one first, a marker file says that locks were
//! held; a server that finds it at start grants only reclaims for
//! [`RECLAIM_GRACE`]. The marker is written when the table stops being
//! empty and removed, by [`Locks::tidy_marker`], once it is empty again
//! (not by a shutdown, which drops every connection's locks).

use crate::meta::BucketId;
use restfs_proto::Ino;
use restfs_proto::locks::LockTable;
use restfs_proto::methods::{HeldLock, LockKind};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// After a restart with locks held, how long only reclaims take locks: two
/// leases, well past the longest wait of a client between reconnection
/// attempts (2 s).
pub const RECLAIM_GRACE: Duration = Duration::from_secs(2 * crate::callbacks::LEASE.as_secs());

#[derive(Default)]
pub struct Locks {
    state: Mutex<State>,
    grace_until: OnceLock<Instant>,
}

#[derive(Default)]
struct State {
    table: LockTable<(BucketId, Ino), (u64, i64)>,
    /// Where the marker lives, if the locks outlive restarts.
    marker: Option<PathBuf>,
    /// The marker file exists.
    marked: bool,
}

/// One lock request: who, which file, which bytes.
pub struct Request {
    pub bucket: BucketId,
    pub ino: Ino,
    pub conn: u64,
    pub owner: i64,
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
    /// Taken again after a reconnection: granted during the grace period.
    pub reclaim: bool,
}

impl Locks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the marker at `path`. If it is there already, locks were held
    /// when the server stopped: start the grace period (true).
    pub fn mark_at(&self, path: PathBuf) -> bool {
        let mut st = self.state();
        st.marked = path.exists();
        st.marker = Some(path);
        st.marked && self.grace_until.set(Instant::now() + RECLAIM_GRACE).is_ok()
    }

    /// Only reclaims are granted (see the module's doc).
    pub fn in_grace(&self) -> bool {
        self.grace_until.get().is_some_and(|until| Instant::now() < *until)
    }

    /// The first lock of another holder that `r` conflicts with. Its pid
    /// is told only to the connection holding it.
    pub fn conflict(&self, r: &Request) -> Option<HeldLock> {
        let st = self.state();
        let h = st.table.conflict((r.bucket, r.ino), (r.conn, r.owner), r.start, r.end, r.kind == LockKind::Write)?;
        Some(HeldLock { start: h.start, end: h.end, kind: h.kind(), pid: if h.by.0 == r.conn { h.pid } else { 0 } })
    }

    /// Take, change or drop the range of `r` for its holder; why not when
    /// another holder's lock conflicts, or when only reclaims are granted.
    pub fn set(&self, r: &Request) -> Result<(), &'static str> {
        if r.kind != LockKind::Unlock && !r.reclaim && self.in_grace() {
            return Err("restfsd restarted moments ago: the locks held before are being taken again");
        }
        let mut st = self.state();
        if !st.table.set((r.bucket, r.ino), (r.conn, r.owner), r.start, r.end, r.kind, r.pid) {
            return Err("a conflicting lock is held");
        }
        if !st.marked
            && !st.table.is_empty()
            && let Some(path) = &st.marker
        {
            match std::fs::write(path, b"locks are held; see restfs-server's locks.rs\n") {
                Ok(()) => st.marked = true,
                Err(e) => tracing::warn!("cannot write {}: {e}; a restart will not wait for the locks to be reclaimed", path.display()),
            }
        }
        Ok(())
    }

    /// Remove the marker if no lock is held (and the grace period is over).
    pub fn tidy_marker(&self) {
        let mut st = self.state();
        if !st.marked || !st.table.is_empty() || self.in_grace() {
            return;
        }
        if let Some(path) = &st.marker {
            match std::fs::remove_file(path) {
                Ok(()) => st.marked = false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => st.marked = false,
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }

    /// Connection `from` is replaced by `to` (the same client): its locks
    /// go over, so nobody else can take them before the client reclaims.
    pub fn move_connection(&self, from: u64, to: u64) {
        self.state().table.move_holders(|h| (h.0 == from).then_some((to, h.1)));
    }

    /// The connection `conn` is gone: so are its locks.
    pub fn drop_connection(&self, conn: u64) {
        self.state().table.drop_holders(|h| h.0 == conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(conn: u64, kind: LockKind, reclaim: bool) -> Request {
        Request { bucket: 1, ino: 7, conn, owner: 1, start: 0, end: u64::MAX, kind, pid: 1, reclaim }
    }

    #[test]
    fn the_marker_follows_the_table_and_starts_a_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.held");
        let locks = Locks::default();
        assert!(!locks.mark_at(path.clone()), "no marker, no grace");
        locks.set(&request(1, LockKind::Write, false)).unwrap();
        assert!(path.exists(), "written with the first lock");
        locks.tidy_marker();
        assert!(path.exists(), "kept while a lock is held");

        // A restart: only reclaims are granted.
        let after = Locks::default();
        assert!(after.mark_at(path.clone()));
        assert!(after.set(&request(2, LockKind::Read, false)).is_err(), "a new lock waits for the grace period");
        after.set(&request(3, LockKind::Write, true)).unwrap();
        after.set(&request(2, LockKind::Unlock, false)).unwrap();
        after.set(&request(3, LockKind::Unlock, true)).unwrap();
        after.tidy_marker();
        assert!(path.exists(), "kept through the grace period");

        locks.set(&request(1, LockKind::Unlock, false)).unwrap();
        locks.tidy_marker();
        assert!(!path.exists(), "removed once no lock is held");
    }
}
