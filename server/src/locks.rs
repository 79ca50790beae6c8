//! Byte-range locks held for clients (`fcntl` locks, and `flock` as
//! whole-file locks, as NFS does), in memory. A holder is one connection
//! and an owner that client names; its locks go with the connection.

use crate::meta::BucketId;
use restfs_proto::Ino;
use restfs_proto::locks::LockTable;
use restfs_proto::methods::{HeldLock, LockKind};
use std::sync::Mutex;

#[derive(Default)]
pub struct Locks {
    table: Mutex<LockTable<(BucketId, Ino), (u64, i64)>>,
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
}

impl Locks {
    fn table(&self) -> std::sync::MutexGuard<'_, LockTable<(BucketId, Ino), (u64, i64)>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first lock of another holder that `r` conflicts with. Its pid
    /// is told only to the connection holding it.
    pub fn conflict(&self, r: &Request) -> Option<HeldLock> {
        let table = self.table();
        let h = table.conflict((r.bucket, r.ino), (r.conn, r.owner), r.start, r.end, r.kind == LockKind::Write)?;
        Some(HeldLock { start: h.start, end: h.end, kind: h.kind(), pid: if h.by.0 == r.conn { h.pid } else { 0 } })
    }

    /// Take, change or drop the range of `r` for its holder; `false` when
    /// another holder's lock conflicts.
    pub fn set(&self, r: &Request) -> bool {
        self.table().set((r.bucket, r.ino), (r.conn, r.owner), r.start, r.end, r.kind, r.pid)
    }

    /// Connection `from` is replaced by `to` (the same client): its locks
    /// go over, so nobody else can take them before the client reclaims.
    pub fn move_connection(&self, from: u64, to: u64) {
        self.table().move_holders(|h| (h.0 == from).then_some((to, h.1)));
    }

    /// The connection `conn` is gone: so are its locks.
    pub fn drop_connection(&self, conn: u64) {
        self.table().drop_holders(|h| h.0 == conn);
    }
}
