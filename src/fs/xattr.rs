//! Extended attributes, and what this client knows of them.
//!
//! The kernel asks for `security.capability` before every `write()`, so a
//! cache of xattr answers spares a round trip per write (and lets writes go
//! on while the server is away). Knowledge of an inode is valid while the
//! inode's cached ctime is the one it was learnt at: every xattr change
//! moves ctime, and pushes bring the new one. A file this client just
//! created is known to have none. This client's own commits change no
//! xattr, so the knowledge carries over them, unless a push in between
//! showed a ctime that the commit does not explain.

use super::error::{FsError, Result};
use super::{Fs, lock};
use restfs_proto::methods::{Change, GetXattr, InoParams, ListXattr, RemoveXattr, SetXattr, SetXattrParams, XattrMode, XattrParams};
use restfs_proto::{Bytes, Errno, Ino, Name, Timespec, acl};
use std::collections::HashMap;
use std::sync::Mutex;

/// Pushed ctimes remembered per inode before its knowledge is dropped.
const MAX_SUSPECTS: usize = 8;

struct Known {
    ctime: Timespec,
    /// Values by name; `None`: known absent.
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Names not in `values` are absent.
    complete: bool,
    /// Other ctimes pushed since: a change by someone, maybe to xattrs.
    suspects: Vec<Timespec>,
}

impl Known {
    fn new(ctime: Timespec, complete: bool) -> Known {
        Known { ctime, values: HashMap::new(), complete, suspects: Vec::new() }
    }

    fn valid_at(&self, ctime: Timespec) -> bool {
        self.ctime == ctime && self.suspects.is_empty()
    }
}

/// Xattr knowledge per inode (see the module doc).
#[derive(Default)]
pub struct XattrCache {
    known: Mutex<HashMap<Ino, Known>>,
}

impl XattrCache {
    /// This client just created `ino` (ctime `ctime`): it has no xattrs.
    pub fn created(&self, ino: Ino, ctime: Timespec) {
        lock(&self.known).insert(ino, Known::new(ctime, true));
    }

    /// `Some(answer)` if known at `ctime`; `None` if the server must say.
    fn answer(&self, ino: Ino, ctime: Timespec, name: &[u8]) -> Option<Result<Vec<u8>>> {
        let known = lock(&self.known);
        let k = known.get(&ino).filter(|k| k.valid_at(ctime))?;
        match k.values.get(name) {
            Some(Some(v)) => Some(Ok(v.clone())),
            Some(None) => Some(Err(FsError::new(Errno::ENODATA, "no such xattr (cached)"))),
            None if k.complete => Some(Err(FsError::new(Errno::ENODATA, "no such xattr (cached)"))),
            None => None,
        }
    }

    /// Is `name` known to be absent from `ino` at `ctime`?
    pub fn known_absent(&self, ino: Ino, ctime: Timespec, name: &[u8]) -> bool {
        matches!(self.answer(ino, ctime, name), Some(Err(_)))
    }

    /// Is anything at all known of `name` on `ino`, current or not? (A
    /// check that needs no ctime; [`XattrCache::known_absent`] decides.)
    pub fn knows_of(&self, ino: Ino, name: &[u8]) -> bool {
        lock(&self.known).get(&ino).is_some_and(|k| k.complete || k.values.contains_key(name))
    }

    fn learn(&self, ino: Ino, ctime: Timespec, name: &[u8], value: Option<Vec<u8>>) {
        let mut known = lock(&self.known);
        let k = known.entry(ino).or_insert_with(|| Known::new(ctime, false));
        if !k.valid_at(ctime) {
            *k = Known::new(ctime, false);
        }
        k.values.insert(name.to_vec(), value);
    }

    fn forget(&self, ino: Ino) {
        lock(&self.known).remove(&ino);
    }

    /// This client committed `ino`'s content: its ctime went from `before`
    /// to `after`, its xattrs did not change.
    pub fn committed(&self, ino: Ino, before: Timespec, after: Timespec) {
        if let Some(k) = lock(&self.known).get_mut(&ino)
            && k.ctime == before
            && k.suspects.iter().all(|c| *c == after)
        {
            k.ctime = after;
            k.suspects.clear();
        }
    }

    /// This client changed `ino`'s mode to `mode` (ctime `before` to
    /// `after`): an access ACL follows the mode (see `restfs_proto::acl`),
    /// so it is known after only if known before.
    pub fn chmodded(&self, ino: Ino, before: Timespec, after: Timespec, mode: u32) {
        let mut known = lock(&self.known);
        let Some(k) = known.get_mut(&ino) else { return };
        let access = match k.values.get(acl::ACCESS) {
            Some(Some(v)) => acl::Acl::parse(v).map(|mut a| {
                a.chmod(mode);
                Some(a.to_bytes())
            }),
            Some(None) => Some(None),
            None if k.complete => Some(None),
            None => None,
        };
        match access {
            Some(access) => {
                k.values.insert(acl::ACCESS.to_vec(), access);
                drop(known);
                self.committed(ino, before, after);
            }
            None => {
                known.remove(&ino);
            }
        }
    }

    /// Note the ctimes a push brings.
    pub fn pushed(&self, changes: &[Change]) {
        let mut known = lock(&self.known);
        for change in changes {
            let Change::Attr { ino, attr, .. } = change else { continue };
            let Some(k) = known.get_mut(ino) else { continue };
            let suspect = match attr {
                Some(a) if a.ctime == k.ctime => continue,
                Some(a) => a.ctime,
                None => Timespec::default(),
            };
            if k.suspects.len() < MAX_SUSPECTS {
                k.suspects.push(suspect);
            } else {
                known.remove(ino);
            }
        }
    }
}

impl Fs {
    pub async fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        if name == super::metrics::STATS_XATTR.as_bytes() {
            return Err(FsError::new(Errno::EPERM, "restfs.stats is read-only"));
        }
        let p = SetXattrParams { ino, name: Name::from(name), value: Bytes(value.to_vec()), mode };
        // Forgotten before too: nothing may be answered from what is about to change.
        self.xattrs.forget(ino);
        let r = self.ordered().await.call::<SetXattr>(p).await;
        self.xattrs.forget(ino);
        self.forget(|m| m.forget_attr(ino));
        Ok(r.map(|_| ())?)
    }

    pub async fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        if name == super::metrics::STATS_XATTR.as_bytes() {
            let mut snapshot = self.metrics().snapshot();
            let d = &self.remote.delegation;
            (snapshot.delegated, snapshot.changes_queued) = (d.active(), d.backlog());
            snapshot.counters.insert(super::metrics::CHANGES_DELEGATED.into(), d.local_changes());
            snapshot.counters.insert(super::metrics::ABSENT_NAMES.into(), lock(&self.absent).len() as u64);
            if let Some(ring) = &self.remote.ring {
                snapshot.counters.insert(super::metrics::BLOCKS_PINNED.into(), ring.stats().pinned);
            }
            return Ok(serde_json::to_vec(&snapshot).expect("a snapshot serializes"));
        }
        let ctime = || self.mc().and_then(|m| m.attr(ino).ok().flatten()).map(|a| a.ctime);
        let before = ctime();
        if let Some(c) = before
            && let Some(answer) = self.xattrs.answer(ino, c, name)
        {
            return answer;
        }
        let r = self.ordered().await.call::<GetXattr>(XattrParams { ino, name: Name::from(name) }).await.map(|v| v.value.0);
        let value = match &r {
            Ok(v) => Some(Some(v.clone())),
            Err(e) if e.as_errno() == Errno::ENODATA => Some(None),
            Err(_) => None,
        };
        // Learnt only if nothing moved the ctime meanwhile.
        if let (Some(c), Some(value)) = (before, value)
            && ctime() == Some(c)
        {
            self.xattrs.learn(ino, c, name, value);
        }
        Ok(r?)
    }

    pub async fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        Ok(self.ordered().await.call::<ListXattr>(InoParams { ino }).await?.names.into_iter().map(|n| n.0).collect())
    }

    pub async fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.xattrs.forget(ino);
        let r = self.ordered().await.call::<RemoveXattr>(XattrParams { ino, name: Name::from(name) }).await;
        self.xattrs.forget(ino);
        self.forget(|m| m.forget_attr(ino));
        Ok(r.map(|_| ())?)
    }
}
