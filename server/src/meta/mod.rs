//! The metadata store: buckets, inodes, directory entries, block maps,
//! xattrs and the block registry (with reference counts and small blocks
//! stored inline).
//!
//! Every mutation is one atomic transaction: it either happens whole or not
//! at all. POSIX rules that every client must see alike (rename checks,
//! nlink, setgid inheritance, which calls change mtime and ctime) live here,
//! once, rather than in each client. Calls block; the service runs them on
//! tokio's blocking pool. Every backend passes [`conformance`].

pub mod sqlite;

#[cfg(test)]
pub mod conformance;

use crate::error::Result;
use restfs_proto::methods::{NewNodeParams, RenameParams, SetAttrParams, XattrMode};
use restfs_proto::{Attr, BlockRef, BlockSlot, BucketInfo, DirEntry, Hash, Ino, Timespec};

thread_local! {
    static STAMP: std::cell::Cell<Option<Timespec>> = const { std::cell::Cell::new(None) };
}

/// The time a change is stamped with: the server's clock, or, inside
/// [`stamped_at`], the time a delegation holder gave the change (the time
/// it already showed its kernel, so both agree).
pub fn stamp() -> Timespec {
    STAMP.with(|s| s.get()).unwrap_or_else(Timespec::now)
}

/// Run `f` (store calls on this thread) with changes stamped `at`.
pub fn stamped_at<T>(at: Timespec, f: impl FnOnce() -> T) -> T {
    STAMP.with(|s| s.set(Some(at)));
    let out = f();
    STAMP.with(|s| s.set(None));
    out
}

/// A bucket's id inside one store.
pub type BucketId = i64;

/// Which inodes some client still holds open: an unlinked inode that is open
/// is kept (nlink 0) until [`MetaStore::purge`] after its last close.
pub type IsOpen<'a> = &'a dyn Fn(Ino) -> bool;

/// Where a block's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockLocation {
    /// Stored in the metadata store itself (small blocks).
    Inline(Vec<u8>),
    /// Stored in the block store.
    External,
}

/// Result of a directory listing page.
#[derive(Debug, Clone)]
pub struct Listing {
    pub parent: Ino,
    pub entries: Vec<DirEntry>,
    pub more: bool,
}

pub trait MetaStore: Send + Sync {
    // Buckets.
    fn create_bucket(&self, name: &str, block_size: u32, segment_blocks: u32) -> Result<BucketInfo>;
    fn list_buckets(&self) -> Result<Vec<BucketInfo>>;
    /// A bucket by name: ENOENT if there is none.
    fn bucket(&self, name: &str) -> Result<(BucketId, BucketInfo)>;
    fn bucket_by_id(&self, b: BucketId) -> Result<BucketInfo>;
    /// Remove a bucket; ENOTEMPTY if it holds objects and `force` is false.
    fn delete_bucket(&self, name: &str, force: bool) -> Result<()>;

    // Namespace.
    fn lookup(&self, b: BucketId, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn getattr(&self, b: BucketId, ino: Ino) -> Result<Attr>;
    fn setattr(&self, b: BucketId, p: &SetAttrParams) -> Result<Attr>;
    /// Reserve `count` inode numbers for a delegation holder; returns the first.
    fn reserve_inos(&self, b: BucketId, count: u64) -> Result<Ino>;
    /// Create a file, directory or special node; `target` for symlinks.
    /// With `p.ino`, the node gets that number, which must be reserved
    /// ([`MetaStore::reserve_inos`]) and unused.
    fn mknod(&self, b: BucketId, p: &NewNodeParams, target: Option<&[u8]>) -> Result<Attr>;
    fn readlink(&self, b: BucketId, ino: Ino) -> Result<Vec<u8>>;
    fn link(&self, b: BucketId, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn unlink(&self, b: BucketId, parent: Ino, name: &[u8], is_open: IsOpen<'_>) -> Result<()>;
    fn rmdir(&self, b: BucketId, parent: Ino, name: &[u8]) -> Result<()>;
    fn rename(&self, b: BucketId, p: &RenameParams, is_open: IsOpen<'_>) -> Result<()>;
    /// Entries after `after` in name order, at most `limit`.
    fn readdir(&self, b: BucketId, ino: Ino, after: Option<&[u8]>, limit: u32) -> Result<Listing>;
    /// Delete an unlinked (nlink 0) inode unless `is_open` says someone
    /// holds it again (checked inside the transaction). True if it was deleted.
    fn purge(&self, b: BucketId, ino: Ino, is_open: IsOpen<'_>) -> Result<bool>;
    /// Every unlinked inode not yet purged (at start: those left open at
    /// the last stop).
    fn orphans(&self) -> Result<Vec<(BucketId, Ino)>>;

    // Extended attributes.
    fn setxattr(&self, b: BucketId, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()>;
    fn getxattr(&self, b: BucketId, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    fn listxattr(&self, b: BucketId, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn removexattr(&self, b: BucketId, ino: Ino, name: &[u8]) -> Result<()>;

    // Data.
    /// Block map entries `first .. first + count` of a file, and its version.
    fn block_map(&self, b: BucketId, ino: Ino, first: u64, count: u64) -> Result<(u64, Vec<BlockRef>)>;
    /// Set block slots and the size in one step. EAGAIN if a named block is
    /// not registered (the client must put it again).
    fn commit(&self, b: BucketId, ino: Ino, size: u64, slots: &[BlockSlot], mtime: Option<Timespec>) -> Result<Attr>;

    // Block registry.
    fn has_blocks(&self, hashes: &[Hash]) -> Result<Vec<bool>>;
    /// Register a block (unreferenced until a commit names it); `inline`
    /// holds its bytes when the metadata store keeps them.
    fn add_block(&self, hash: &Hash, size: u32, inline: Option<&[u8]>) -> Result<()>;
    /// Where a registered block lives; ENOENT if it is not registered.
    fn block_location(&self, hash: &Hash) -> Result<BlockLocation>;
    /// Forget unreferenced blocks registered more than `min_age_secs` ago;
    /// returns the external ones (to delete from the block store) and the
    /// number and bytes of all forgotten.
    fn collect_garbage(&self, min_age_secs: u64) -> Result<Garbage>;

    /// Commit mutations the store holds back to commit them in a group
    /// (see the SQLite store). Returns whether there were any.
    fn commit_group(&self) -> Result<bool> {
        Ok(false)
    }

    /// Make every mutation so far durable on disk.
    fn sync(&self) -> Result<()>;

    // Change log.
    /// Logged changes of bucket `b` with sequence numbers above `since`,
    /// at most `limit` sequence numbers' worth, in order.
    fn changes_since(&self, b: BucketId, since: u64, limit: u64) -> Result<ChangeLog>;
    /// Keep only the last `keep` sequence numbers of every bucket's log.
    fn trim_changes(&self, keep: u64) -> Result<()>;

    // Replay cache: replies to non-idempotent requests, by client and request id.
    fn remember_reply(&self, client: &str, request: &str, reply: &[u8]) -> Result<()>;
    fn reply(&self, client: &str, request: &str) -> Result<Option<Vec<u8>>>;
    /// Forget these replies of `client` (their requests will not come again).
    fn forget_replies(&self, client: &str, requests: &[String]) -> Result<()>;
    /// Forget replies older than `secs`, except those of `lasting`, which
    /// are kept for `lasting_secs`.
    fn trim_replies(&self, secs: u64, lasting: &str, lasting_secs: u64) -> Result<()>;
}

/// What one logged change names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Changed {
    /// An inode's attributes, content or existence.
    Attr(Ino),
    /// A directory entry: (parent, name).
    Entry(Ino, Vec<u8>),
}

/// A page of a bucket's change log.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// The bucket's latest sequence number.
    pub seq: u64,
    /// Sequence numbers up to this one are no longer in the log.
    pub log_start: u64,
    /// The highest sequence number this page covers.
    pub through: u64,
    pub changes: Vec<(u64, Changed)>,
}

/// What [`MetaStore::collect_garbage`] removed.
#[derive(Debug, Default, Clone)]
pub struct Garbage {
    pub external: Vec<Hash>,
    pub blocks: u64,
    pub bytes: u64,
}
