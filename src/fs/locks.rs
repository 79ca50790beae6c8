//! Byte-range locks across mounts: `fcntl` locks, and `flock` as
//! whole-file locks (as on NFS, the two kinds then see each other).
//!
//! restfsd holds every client's locks (`lock.set`, `lock.get`) and drops
//! a connection's when it goes. This mount keeps its own in a table too:
//! while it holds the delegation nobody else can lock, so it answers lock
//! requests from that table alone and, when recalled, tells the server
//! what changed before giving the delegation back; after a reconnection it
//! takes them all again on the server.
//!
//! Consistency, as NFS gives it: what this mount wrote through a handle is
//! committed before a lock or unlock through it, so whoever takes the lock
//! next reads it (under the delegation, the commit is queued: another mount
//! recalls the delegation, which sends the queue, before it can lock).
//! A blocked `F_SETLKW` or `flock` asks again every few milliseconds, and
//! gives up with `EINTR` once its process has a signal pending (the
//! kernel's interrupt requests do not reach the daemon).

use super::delegation::{LockRoute, ServerLockCall};
use super::error::{FsError, Result};
use super::{Fs, lock};
use restfs_proto::locks::LockTable;
use restfs_proto::methods::{HeldLock, LockGet, LockKind, LockParams, LockSet};
use restfs_proto::{Errno, Ino};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// The longest pause between two tries of a blocked lock.
const RETRY_AT_MOST: Duration = Duration::from_millis(50);

/// How long a reclaim refused after a reconnection is tried again.
const RECLAIM_PATIENCE: Duration = Duration::from_millis(500);

/// The last byte a lock can cover (the kernel's "to the end of the file").
const LAST_BYTE: u64 = i64::MAX as u64;

/// This mount's locks; a holder is (inode, the kernel's lock owner).
#[derive(Default)]
pub struct Holders(std::sync::Mutex<State>);

#[derive(Default)]
struct State {
    /// Every lock held here, whether the server knows it yet or not.
    table: LockTable<Ino, i64>,
    /// Holders whose locks changed under the delegation, unknown to the server.
    unsent: HashSet<(Ino, i64)>,
    /// The handles each holder took locks through.
    handles: HashMap<(Ino, i64), HashSet<u64>>,
}

fn kind_of(typ: i32) -> Result<LockKind> {
    match typ {
        libc::F_RDLCK => Ok(LockKind::Read),
        libc::F_WRLCK => Ok(LockKind::Write),
        libc::F_UNLCK => Ok(LockKind::Unlock),
        _ => Err(FsError::new(Errno::EINVAL, format!("lock type {typ}"))),
    }
}

fn typ_of(kind: LockKind) -> i32 {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    }
}

/// Try `attempt` again, after pauses growing up to [`RETRY_AT_MOST`], while
/// it answers `EAGAIN`; `EINTR` once thread `waiter` has a signal pending.
async fn while_busy<T, Fut: std::future::Future<Output = Result<T>>>(waiter: u32, mut attempt: impl FnMut() -> Fut) -> Result<T> {
    let mut pause = Duration::from_millis(2);
    loop {
        match attempt().await {
            Err(e) if e.errno == Errno::EAGAIN => {
                if signal_pending(waiter) {
                    return Err(FsError::new(Errno::EINTR, "interrupted while waiting for a lock"));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_AT_MOST);
            }
            done => return done,
        }
    }
}

/// Thread `tid` has a signal pending that it does not block, or is gone.
fn signal_pending(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let status = match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => status,
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
    };
    let mask =
        |field: &str| status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

fn refused() -> FsError {
    FsError::new(Errno::EAGAIN, "a conflicting lock is held")
}

impl Fs {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.locks.0)
    }

    /// F_GETLK: the first lock of another holder that `typ` over
    /// `start..=end` would conflict with, as (start, end, type, pid).
    /// `asker` is the thread asking, for a wait a signal ends.
    pub async fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        (start, end): (u64, u64),
        typ: i32,
        pid: u32,
        asker: u32,
    ) -> Result<(u64, u64, i32, u32)> {
        let (owner, kind) = (owner as i64, kind_of(typ)?);
        let route = self
            .route(|st| {
                st.table.conflict(ino, owner, start, end, kind == LockKind::Write).map(|h| HeldLock {
                    start: h.start,
                    end: h.end,
                    kind: h.kind(),
                    pid: h.pid,
                })
            })
            .await;
        let conflict = match route {
            Ok(c) => c,
            // EAGAIN: the server restarted moments ago and its clients are
            // still taking their locks again; it answers after.
            Err(_call) => {
                let params = LockParams { ino, owner, start, end, kind, pid, reclaim: false };
                while_busy(asker, || async { Ok(self.link().call::<LockGet>(params.clone()).await?.conflict) }).await?
            }
        };
        Ok(conflict.map_or((0, 0, libc::F_UNLCK, 0), |h| (h.start, h.end, typ_of(h.kind), h.pid)))
    }

    /// Run `f` on the table if the delegation is held; else, once any
    /// recall under way has handed the locks to the server, the server
    /// call to make, counted in flight until dropped.
    async fn route<T>(&self, mut f: impl FnMut(&mut State) -> T) -> std::result::Result<T, ServerLockCall<'_>> {
        let d = &self.remote.delegation;
        loop {
            match d.route_lock(|| f(&mut self.lock_state())) {
                LockRoute::Here(out) => return Ok(out),
                LockRoute::Server(call) => return Err(call),
                LockRoute::Wait => d.lock_route_open().await,
            }
        }
    }

    /// F_SETLK (`sleep`: F_SETLKW), and flock: take, change or drop a
    /// lock for process `pid`; `waiter` is the thread asking.
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        owner: u64,
        (start, end): (u64, u64),
        typ: i32,
        pid: u32,
        waiter: u32,
        sleep: bool,
    ) -> Result<()> {
        let (owner, kind) = (owner as i64, kind_of(typ)?);
        let mut committed = Ok(());
        if let Ok(file) = self.file_handle(fh) {
            let mut st = file.lock().await;
            committed = self.commit(&mut st).await.map(|_| ());
        }
        // An unlock goes on even if the commit failed (reported after).
        if kind != LockKind::Unlock {
            committed.clone()?;
        }
        if sleep {
            while_busy(waiter, || self.set_lock(ino, owner, start, end, kind, pid)).await?;
        } else {
            self.set_lock(ino, owner, start, end, kind, pid).await?;
        }
        if kind != LockKind::Unlock {
            self.lock_state().handles.entry((ino, owner)).or_default().insert(fh);
        }
        committed
    }

    /// One try: from the table under the delegation, else on the server
    /// (and then in the table).
    async fn set_lock(&self, ino: Ino, owner: i64, start: u64, end: u64, kind: LockKind, pid: u32) -> Result<()> {
        let route = self
            .route(|st| {
                let taken = st.table.set(ino, owner, start, end, kind, pid);
                if taken {
                    st.unsent.insert((ino, owner));
                }
                taken
            })
            .await;
        let taken = match route {
            Ok(taken) => taken,
            Err(_call) => {
                match self
                    .link()
                    .call::<LockSet>(LockParams { ino, owner, start, end, kind, pid, reclaim: false })
                    .await
                    .map_err(FsError::from)
                {
                    Ok(_) => {
                        // The table holds nothing the server does not (no
                        // delegation, no recall under way), so it agrees.
                        if !self.lock_state().table.set(ino, owner, start, end, kind, pid) {
                            tracing::error!("a lock on inode {ino} the server granted conflicts with this mount's own table");
                        }
                        true
                    }
                    Err(e) if e.errno == Errno::EAGAIN => false,
                    Err(e) => return Err(e),
                }
            }
        };
        let mut st = self.lock_state();
        if !st.table.holds(ino, owner) {
            st.handles.remove(&(ino, owner));
        }
        if taken { Ok(()) } else { Err(refused()) }
    }

    /// A close by `owner` (FLUSH, or the RELEASE of a flock's file): drop
    /// the locks it holds on `ino`, if it holds any.
    pub async fn unlock_owner(&self, ino: Ino, owner: u64) -> Result<()> {
        let owner = owner as i64;
        if !self.lock_state().table.holds(ino, owner) {
            return Ok(());
        }
        self.set_lock(ino, owner, 0, LAST_BYTE, LockKind::Unlock, 0).await
    }

    /// The last close of handle `fh`: drop the locks taken through it
    /// (a read-only handle sends no FLUSH at close).
    pub async fn unlock_handle(&self, fh: u64) -> Result<()> {
        let holders: Vec<(Ino, i64)> =
            self.lock_state().handles.iter().filter(|(_, fhs)| fhs.contains(&fh)).map(|(holder, _)| *holder).collect();
        let mut first = Ok(());
        for (ino, owner) in holders {
            let unlocked = self.set_lock(ino, owner, 0, LAST_BYTE, LockKind::Unlock, 0).await;
            if first.is_ok() {
                first = unlocked;
            }
        }
        first
    }

    /// The delegation goes back: tell the server the locks that changed
    /// under it (each holder's are replaced whole).
    pub(super) async fn send_locks(&self) {
        let sends: Vec<LockParams> = {
            let mut st = self.lock_state();
            let unsent = std::mem::take(&mut st.unsent);
            // Every old lock goes before any new one is taken, or a holder's
            // new lock would meet another's old one.
            let mut sends: Vec<LockParams> = unsent
                .iter()
                .map(|&(ino, owner)| LockParams { ino, owner, start: 0, end: LAST_BYTE, kind: LockKind::Unlock, pid: 0, reclaim: false })
                .collect();
            for (ino, h) in st.table.all().filter(|(ino, h)| unsent.contains(&(*ino, h.by))) {
                // Granted already, under the delegation.
                sends.push(LockParams { ino, owner: h.by, start: h.start, end: h.end, kind: h.kind(), pid: h.pid, reclaim: true });
            }
            sends
        };
        for p in sends {
            let ino = p.ino;
            if let Err(e) = self.link().call::<LockSet>(p).await {
                tracing::warn!("a lock on inode {ino} is lost: the server refused it ({e})");
            }
        }
    }

    /// A new connection: take this mount's locks again. restfsd moved
    /// them over from the old connection if it was still open (with what
    /// changed under the delegation since unknown to it: those holders'
    /// locks are dropped first, as at a recall), else dropped them with it.
    /// One another mount took meanwhile (restfsd restarted, or this mount
    /// was cut off past its lease) is lost: it leaves the table, and the
    /// log says so. A lost connection fails the restore, which is tried
    /// again with the table as it was.
    pub(super) async fn reclaim_locks(&self, link: &crate::client::Link) -> std::result::Result<(), restfs_proto::RpcError> {
        let (unlocks, mut sends): (Vec<LockParams>, Vec<LockParams>) = {
            let st = self.lock_state();
            let unlocks = st
                .unsent
                .iter()
                .map(|&(ino, owner)| LockParams { ino, owner, start: 0, end: LAST_BYTE, kind: LockKind::Unlock, pid: 0, reclaim: false })
                .collect();
            let sends = st
                .table
                .all()
                .map(|(ino, h)| LockParams { ino, owner: h.by, start: h.start, end: h.end, kind: h.kind(), pid: h.pid, reclaim: true })
                .collect();
            (unlocks, sends)
        };
        let lost_link = |e: &restfs_proto::RpcError| matches!(e.as_errno(), Errno::ENOTCONN | Errno::ETIMEDOUT);
        for p in unlocks {
            if let Err(e) = link.call_now::<LockSet>(p).await
                && lost_link(&e)
            {
                return Err(e);
            }
        }
        // A request of the old connection still running may hold one a moment.
        let deadline = tokio::time::Instant::now() + RECLAIM_PATIENCE;
        let mut pause = Duration::from_millis(5);
        loop {
            let mut refused = Vec::new();
            for p in sends {
                match link.call_now::<LockSet>(p.clone()).await {
                    Ok(_) => {}
                    Err(e) if lost_link(&e) => return Err(e),
                    Err(e) => refused.push((p, e)),
                }
            }
            let waiting = refused.iter().any(|(_, e)| e.as_errno() == Errno::EAGAIN);
            if refused.is_empty() || !waiting || tokio::time::Instant::now() + pause > deadline {
                let mut st = self.lock_state();
                st.unsent.clear();
                for (p, e) in refused {
                    tracing::error!("a lock on inode {} held before the reconnection is lost: {e}", p.ino);
                    st.table.set(p.ino, p.owner, p.start, p.end, LockKind::Unlock, 0);
                }
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            sends = refused.into_iter().map(|(p, _)| p).collect();
        }
    }
}
