//! Byte-range locks held for clients (`fcntl` locks, and `flock` as
//! whole-file locks, as NFS does), in memory. A holder is one connection
//! and an owner that client names; its locks go with the connection.
//!
//! Across a restart, the clients take their locks again (reclaims). So
//! that nobody else takes one first, a marker file names the clients that
//! hold locks, or a delegation (whose holder answers locks itself). A
//! server that finds it at start grants only reclaims, and no delegation,
//! until each client named has restored its session, or for at most
//! [`RECLAIM_GRACE`]. The marker is written when a client not named yet
//! takes a lock or a delegation, and removed, by [`Locks::tidy_marker`],
//! once no lock or delegation is held (not by a shutdown, which drops every
//! connection's locks).

use crate::meta::BucketId;
use restfs_proto::Ino;
use restfs_proto::locks::LockTable;
use restfs_proto::methods::{HeldLock, LockKind};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// After a restart with locks held, how long at most only reclaims take
/// locks: two leases, well past the longest wait of a client between
/// reconnection attempts (2 s).
pub const RECLAIM_GRACE: Duration = Duration::from_secs(2 * crate::callbacks::LEASE.as_secs());

/// How the marker names a client that gave no id: waited for until the
/// grace period ends.
pub const UNNAMED: &str = "*";

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
    /// The clients the marker names (it exists if there are any).
    named: BTreeSet<String>,
    /// The clients named by the marker found at start that have not yet
    /// restored their session; the grace period ends with the last.
    awaited: BTreeSet<String>,
}

impl State {
    /// Name `client` in the marker, if it is not yet.
    fn name(&mut self, client: &str) {
        let Some(path) = &self.marker else { return };
        if self.named.contains(client) {
            return;
        }
        let mut named = self.named.clone();
        named.insert(client.to_string());
        let text: String = named.iter().map(|c| format!("{c}\n")).collect();
        match std::fs::write(path, text) {
            Ok(()) => self.named = named,
            Err(e) => tracing::warn!("cannot write {}: {e}; a restart will not wait for the locks to be taken again", path.display()),
        }
    }
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
    /// The client's id (`hello`), or [`UNNAMED`].
    pub client: String,
}

impl Locks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the marker at `path`. If it is there already, clients held
    /// locks when the server stopped: start the grace period (true).
    pub fn mark_at(&self, path: PathBuf) -> bool {
        let mut st = self.state();
        let named: BTreeSet<String> =
            std::fs::read_to_string(&path).unwrap_or_default().lines().filter(|l| !l.is_empty()).map(String::from).collect();
        // A marker from before clients were named in it: wait the whole grace.
        let awaited = if named.is_empty() && path.exists() { BTreeSet::from([UNNAMED.to_string()]) } else { named.clone() };
        st.marker = Some(path);
        st.named = named;
        st.awaited = awaited;
        !st.awaited.is_empty() && self.grace_until.set(Instant::now() + RECLAIM_GRACE).is_ok()
    }

    /// Only reclaims are granted (see the module's doc).
    pub fn in_grace(&self) -> bool {
        self.grace_until.get().is_some_and(|until| Instant::now() < *until) && !self.state().awaited.is_empty()
    }

    /// `client` restored its session (its locks are taken again).
    pub fn restored(&self, client: &str) {
        self.state().awaited.remove(client);
    }

    /// `client` holds a delegation: name it in the marker.
    pub fn delegated(&self, client: &str) {
        self.state().name(client);
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
        if r.kind != LockKind::Unlock {
            st.name(&r.client);
        }
        Ok(())
    }

    /// Remove the marker if no lock is held, nor a delegation (`delegating`),
    /// and the grace period is over.
    pub fn tidy_marker(&self, delegating: bool) {
        if delegating || self.in_grace() {
            return;
        }
        let mut st = self.state();
        if st.named.is_empty() || !st.table.is_empty() {
            return;
        }
        if let Some(path) = &st.marker {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!("cannot remove {}: {e}", path.display()),
                _ => st.named.clear(),
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
        Request { bucket: 1, ino: 7, conn, owner: 1, start: 0, end: u64::MAX, kind, pid: 1, reclaim, client: format!("client {conn}") }
    }

    #[test]
    fn the_marker_names_the_holders_and_starts_a_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.held");
        let locks = Locks::default();
        assert!(!locks.mark_at(path.clone()), "no marker, no grace");
        locks.set(&request(1, LockKind::Write, false)).unwrap();
        locks.delegated("client 9");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "client 1\nclient 9\n");
        locks.tidy_marker(false);
        assert!(path.exists(), "kept while a lock is held");

        // A restart: only reclaims are granted, until both named clients are back.
        let after = Locks::default();
        assert!(after.mark_at(path.clone()));
        assert!(after.set(&request(2, LockKind::Read, false)).is_err(), "a new lock waits for the grace period");
        after.set(&request(1, LockKind::Write, true)).unwrap();
        after.restored("client 1");
        assert!(after.in_grace(), "client 9 is not back");
        after.restored("client 9");
        assert!(!after.in_grace(), "everyone named is back");
        after.set(&request(1, LockKind::Unlock, false)).unwrap();
        after.tidy_marker(true);
        assert!(path.exists(), "kept while a delegation is held");
        after.tidy_marker(false);
        assert!(!path.exists(), "removed once no lock or delegation is held");

        // A client without an id is waited for until the grace period ends.
        locks.set(&request(1, LockKind::Unlock, false)).unwrap();
        locks.set(&Request { client: UNNAMED.into(), ..request(3, LockKind::Write, false) }).unwrap();
        let again = Locks::default();
        assert!(again.mark_at(path.clone()));
        again.restored("client 1");
        again.restored("client 9");
        assert!(again.in_grace(), "an unnamed holder is waited for until the grace period ends");
    }
}
