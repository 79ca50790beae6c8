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
//! takes a lock or a delegation; every second [`Locks::tidy_marker`] names
//! only the clients still holding one, and removes it once none does (not
//! once shutting down, which drops every connection's locks).

use crate::meta::BucketId;
use restfs_proto::Ino;
use restfs_proto::locks::LockTable;
use restfs_proto::methods::{HeldLock, LockKind};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// After a restart with locks held, how long at most only reclaims take
/// locks: two leases, well past the longest wait of a client between
/// reconnection attempts (2 s).
pub const RECLAIM_GRACE: Duration = Duration::from_secs(2 * crate::callbacks::LEASE.as_secs());

/// How the marker names a client that gave no id: waited for until the
/// grace period ends.
pub const UNNAMED: &str = "*";

/// Why a lock request waits during the grace period.
pub const IN_GRACE: &str = "restfsd restarted moments ago: the locks held before are being taken again";

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
    /// The client of each connection holding locks or a delegation.
    clients: HashMap<u64, String>,
    /// Shutting down: the marker stays as it is.
    stopped: bool,
}

impl State {
    /// Name `client` (of connection `conn`) in the marker, if it is not yet.
    fn name(&mut self, conn: u64, client: &str) {
        self.clients.insert(conn, client.to_string());
        if !self.named.contains(client) {
            let mut named = self.named.clone();
            named.insert(client.to_string());
            self.rewrite(named);
        }
    }

    /// Make the marker name `named` (none: remove it).
    fn rewrite(&mut self, named: BTreeSet<String>) {
        let Some(path) = &self.marker else { return };
        match write_marker(path, &named) {
            Ok(()) => self.named = named,
            Err(e) => tracing::warn!("cannot write {}: {e}; a restart may not wait for the locks to be taken again", path.display()),
        }
    }
}

/// Write the marker whole (a new file renamed over the old one), or remove it.
fn write_marker(path: &Path, named: &BTreeSet<String>) -> std::io::Result<()> {
    if named.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, named.iter().map(|c| format!("{c}\n")).collect::<String>())?;
    std::fs::rename(&fresh, path)
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
        let awaited: BTreeSet<String> = match std::fs::read_to_string(&path) {
            // A marker that names nobody: wait the whole grace.
            Ok(text) if text.trim().is_empty() => BTreeSet::from([UNNAMED.to_string()]),
            Ok(text) => text.lines().filter(|l| !l.is_empty()).map(String::from).collect(),
            Err(_) => BTreeSet::new(),
        };
        st.marker = Some(path);
        // Named as awaited, so that the first tick after the grace rewrites
        // (or removes) a marker that named nobody.
        st.named = awaited.clone();
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

    /// `client`, on connection `conn`, holds a delegation: name it in the marker.
    pub fn delegated(&self, conn: u64, client: &str) {
        self.state().name(conn, client);
    }

    /// Shutting down: leave the marker as it is.
    pub fn stop_tidying(&self) {
        self.state().stopped = true;
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
            return Err(IN_GRACE);
        }
        let mut st = self.state();
        if !st.table.set((r.bucket, r.ino), (r.conn, r.owner), r.start, r.end, r.kind, r.pid) {
            return Err("a conflicting lock is held");
        }
        if r.kind != LockKind::Unlock {
            st.name(r.conn, &r.client);
        }
        Ok(())
    }

    /// Name in the marker only the clients still holding locks, or a
    /// delegation (the connections `delegating` lists, asked under the same
    /// lock as [`Locks::delegated`] takes after a grant), once the grace
    /// period is over; none left, remove it.
    pub fn tidy_marker(&self, delegating: impl FnOnce() -> Vec<u64>) {
        if self.in_grace() {
            return;
        }
        let mut st = self.state();
        if st.stopped || st.marker.is_none() {
            return;
        }
        let mut holders: HashSet<u64> = st.table.all().map(|(_, h)| h.by.0).collect();
        holders.extend(delegating());
        st.clients.retain(|conn, _| holders.contains(conn));
        let named: BTreeSet<String> = st.clients.values().cloned().collect();
        if named != st.named {
            st.rewrite(named);
        }
    }

    /// Connection `from` is replaced by `to` (the same client): its locks
    /// go over, so nobody else can take them before the client reclaims.
    pub fn move_connection(&self, from: u64, to: u64) {
        let mut st = self.state();
        st.table.move_holders(|h| (h.0 == from).then_some((to, h.1)));
        if let Some(client) = st.clients.get(&from).cloned() {
            st.clients.insert(to, client);
        }
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
        locks.delegated(9, "client 9");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "client 1\nclient 9\n");
        locks.tidy_marker(|| vec![9]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "client 1\nclient 9\n", "kept while held");

        // A restart: only reclaims are granted, until both named clients are back.
        let after = Locks::default();
        assert!(after.mark_at(path.clone()));
        assert!(after.set(&request(2, LockKind::Read, false)).is_err(), "a new lock waits for the grace period");
        after.set(&request(1, LockKind::Write, true)).unwrap();
        after.restored("client 1");
        assert!(after.in_grace(), "client 9 is not back");
        after.restored("client 9");
        assert!(!after.in_grace(), "everyone named is back");
        after.delegated(9, "client 9");
        after.tidy_marker(|| vec![9]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "client 1\nclient 9\n");
        after.set(&request(1, LockKind::Unlock, false)).unwrap();
        after.tidy_marker(|| vec![9]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "client 9\n", "only the clients still holding one");
        after.stop_tidying();
        after.tidy_marker(Vec::new);
        assert!(path.exists(), "left as it is once shutting down");
        let tidy = Locks::default();
        tidy.mark_at(path.clone());
        tidy.restored("client 9");
        tidy.tidy_marker(Vec::new);
        assert!(!path.exists(), "removed once no lock or delegation is held");

        // A client without an id is waited for until the grace period ends.
        locks.set(&request(1, LockKind::Unlock, false)).unwrap();
        locks.set(&Request { client: UNNAMED.into(), ..request(3, LockKind::Write, false) }).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "*\nclient 1\nclient 9\n");
        let again = Locks::default();
        assert!(again.mark_at(path.clone()));
        again.restored("client 1");
        again.restored("client 9");
        assert!(again.in_grace(), "an unnamed holder is waited for until the grace period ends");
    }
}
