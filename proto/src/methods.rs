//! Every RPC method: its wire name, parameters and result.
//!
//! A method is a zero-sized type implementing [`Method`], so a client call is
//! checked at compile time: `link.call::<Lookup>(LookupParams { .. })`.
//! Object methods (`fs.*`, `seg.*`, `block.*`) act on the bucket chosen by
//! `bucket.mount` on the same connection.

use crate::bytes::{Bytes, Hash, Name};
use crate::types::{Attr, BlockRef, BlockSlot, BucketInfo, DirEntry, Ino, Kind, SetTime, Timespec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// An RPC method.
pub trait Method {
    const NAME: &'static str;
    type Params: Serialize + DeserializeOwned + Send + 'static;
    type Result: Serialize + DeserializeOwned + Send + 'static;
}

macro_rules! methods {
    ($($ty:ident = $name:literal ($params:ty) -> $result:ty;)*) => {
        $(
            #[doc = concat!("The `", $name, "` method.")]
            pub struct $ty;
            impl Method for $ty {
                const NAME: &'static str = $name;
                type Params = $params;
                type Result = $result;
            }
        )*
        /// Wire names of all methods, for `hello` and tests.
        pub const ALL_METHODS: &[&str] = &[$($name),*];
    };
}

methods! {
    Hello = "hello" (HelloParams) -> HelloResult;
    BucketCreate = "bucket.create" (BucketCreateParams) -> BucketInfo;
    BucketList = "bucket.list" (Empty) -> BucketListResult;
    BucketStat = "bucket.stat" (BucketName) -> BucketInfo;
    BucketDelete = "bucket.delete" (BucketDeleteParams) -> Empty;
    BucketMount = "bucket.mount" (BucketName) -> MountResult;
    Delegate = "fs.delegate" (DelegateParams) -> DelegateResult;
    DelegateReturn = "fs.delegate_return" (Empty) -> Empty;
    Recall = "fs.recall" (Empty) -> Empty;
    Batch = "fs.batch" (BatchParams) -> BatchResult;
    Lookup = "fs.lookup" (EntryParams) -> Attr;
    GetAttr = "fs.getattr" (InoParams) -> Attr;
    SetAttr = "fs.setattr" (SetAttrParams) -> Attr;
    Mknod = "fs.mknod" (NewNodeParams) -> Attr;
    Mkdir = "fs.mkdir" (NewNodeParams) -> Attr;
    Create = "fs.create" (CreateParams) -> Attr;
    Symlink = "fs.symlink" (SymlinkParams) -> Attr;
    Readlink = "fs.readlink" (InoParams) -> ReadlinkResult;
    Link = "fs.link" (LinkParams) -> Attr;
    Unlink = "fs.unlink" (EntryParams) -> Changed;
    Rmdir = "fs.rmdir" (EntryParams) -> Changed;
    Rename = "fs.rename" (RenameParams) -> Changed;
    Readdir = "fs.readdir" (ReaddirParams) -> ReaddirResult;
    Open = "fs.open" (InoParams) -> Attr;
    Release = "fs.release" (InoParams) -> Empty;
    SetXattr = "fs.setxattr" (SetXattrParams) -> Empty;
    GetXattr = "fs.getxattr" (XattrParams) -> XattrValue;
    ListXattr = "fs.listxattr" (InoParams) -> XattrNames;
    RemoveXattr = "fs.removexattr" (XattrParams) -> Empty;
    Statfs = "fs.statfs" (Empty) -> StatfsResult;
    Sync = "fs.sync" (Empty) -> Empty;
    SegmentGet = "seg.get" (SegmentGetParams) -> SegmentGetResult;
    SegmentCommit = "seg.commit" (SegmentCommitParams) -> Attr;
    BlockHas = "block.has" (BlockHasParams) -> BlockHasResult;
    BlockPut = "block.put" (BlockPutParams) -> Empty;
    BlockGet = "block.get" (BlockGetParams) -> BlockGetResult;
    Gc = "admin.gc" (GcParams) -> GcResult;
    Subscribe = "bucket.subscribe" (SubscribeParams) -> SubscribeResult;
    Stats = "admin.stats" (Empty) -> StatsResult;
    PushChanges = "push.changes" (PushParams) -> Empty;
    PushAck = "push.ack" (PushAckParams) -> Empty;
    Ping = "ping" (Empty) -> Empty;
    LockSet = "lock.set" (LockParams) -> Empty;
    LockGet = "lock.get" (LockParams) -> LockGetResult;
}

/// No parameters, or no result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Wire encodings a peer may use for its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Json,
    Bson,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloParams {
    /// Protocol versions the client speaks.
    pub versions: Vec<u32>,
    /// Encodings the client can send, in order of preference.
    pub encodings: Vec<Encoding>,
    /// Capabilities the client would like.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free-form client description, for logs.
    #[serde(default)]
    pub client: String,
    /// Stable across the client's reconnections: the server answers a
    /// repeated mutation (same client id and request id) from its replay
    /// cache instead of applying it twice.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The shared secret of a server started with credentials; until the
    /// server has it, it answers nothing but `hello`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloResult {
    pub version: u32,
    pub encoding: Encoding,
    /// Capabilities both sides have.
    pub capabilities: Vec<String>,
    pub server: String,
    /// Largest frame the server accepts, in bytes.
    pub max_frame: u64,
    /// With the callbacks capability: how long after the server last heard
    /// from the client it still waits for the client's push
    /// acknowledgements. The client's lease runs this long from the moment
    /// it sent a request that was answered.
    #[serde(default)]
    pub lease_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketName {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketCreateParams {
    pub name: String,
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub segment_blocks: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketDeleteParams {
    pub name: String,
    /// Delete a bucket that still holds objects.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketListResult {
    pub buckets: Vec<BucketInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountResult {
    pub bucket: BucketInfo,
    pub root: Attr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InoParams {
    pub ino: Ino,
}

/// What `lock.set` does to a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A byte-range lock request (`fcntl` locks; `flock` as whole-file ones).
/// `lock.set` takes, changes or drops it at once, or fails with `EAGAIN`
/// when a lock of another holder conflicts; `lock.get` names the first
/// such lock. A holder is the connection and its `owner`; its locks go
/// when the connection does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockParams {
    pub ino: Ino,
    /// An opaque id the client chooses (i64: BSON has no larger integer).
    pub owner: i64,
    pub start: u64,
    /// Last byte, inclusive (`i64::MAX`, the largest offset: to the end of the file).
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
    /// Taken again after a reconnection: for a short while after a restart
    /// the server grants only these.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reclaim: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockGetResult {
    /// The conflicting lock, if any; its `pid` is 0 unless this connection holds it.
    pub conflict: Option<HeldLock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
}

/// What a removal or rename left: the attributes, after it, of the
/// directories and the inodes it touched that still exist, so the client's
/// caches need not ask again (the kernel re-reads a changed directory's
/// attributes at its next permission check).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Changed {
    #[serde(default)]
    pub attrs: Vec<Attr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryParams {
    pub parent: Ino,
    pub name: Name,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetAttrParams {
    pub ino: Ino,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Truncate or extend; blocks past the new end are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<SetTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<SetTime>,
}

/// A new node. `mode` holds permission bits; `kind` its type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewNodeParams {
    pub parent: Ino,
    pub name: Name,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub rdev: u32,
    /// The inode number to use, from the client's delegation reservation
    /// (`fs.delegate`); the server picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ino: Option<Ino>,
    /// The creating process's umask, applied unless the parent directory
    /// has a default ACL (see `acl`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub umask: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A new regular file, registered as open by this connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateParams {
    pub parent: Ino,
    pub name: Name,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Do not register the open: the client holds a callbacks lease and
    /// registers it only if the file is unlinked while open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unregistered: bool,
    /// As in [`NewNodeParams`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub umask: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SymlinkParams {
    pub parent: Ino,
    pub name: Name,
    pub target: Name,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadlinkResult {
    pub target: Name,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkParams {
    pub ino: Ino,
    pub parent: Ino,
    pub name: Name,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenameParams {
    pub parent: Ino,
    pub name: Name,
    pub new_parent: Ino,
    pub new_name: Name,
    /// Fail with EEXIST if the target exists (RENAME_NOREPLACE).
    #[serde(default)]
    pub noreplace: bool,
    /// Swap source and target atomically (RENAME_EXCHANGE).
    #[serde(default)]
    pub exchange: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReaddirParams {
    pub ino: Ino,
    /// Resume after this name (names are returned in byte order).
    #[serde(default)]
    pub after: Option<Name>,
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReaddirResult {
    /// The directory's parent (itself for the root), for `..`.
    pub parent: Ino,
    pub entries: Vec<DirEntry>,
    /// More entries follow the last one returned.
    pub more: bool,
}

/// How setxattr treats an existing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// Fail with EEXIST if it exists (XATTR_CREATE).
    Create,
    /// Fail with ENODATA if it does not (XATTR_REPLACE).
    Replace,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetXattrParams {
    pub ino: Ino,
    pub name: Name,
    pub value: Bytes,
    pub mode: XattrMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XattrParams {
    pub ino: Ino,
    pub name: Name,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XattrValue {
    pub value: Bytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XattrNames {
    pub names: Vec<Name>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatfsResult {
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub namelen: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentGetParams {
    pub ino: Ino,
    /// Segment number: blocks `segment * segment_blocks ..` of the file.
    pub segment: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentGetResult {
    /// Data version of the file the map belongs to.
    pub version: u64,
    pub blocks: Vec<BlockRef>,
}

/// Publish new content: set block slots and the size in one atomic step.
/// Every block named must already be on the server, or come in `blocks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentCommitParams {
    pub ino: Ino,
    pub size: u64,
    pub slots: Vec<BlockSlot>,
    /// Modification time of the data; the server's clock when absent.
    #[serde(default)]
    pub mtime: Option<Timespec>,
    /// Blocks to store first, in the same call (small ones: sending them
    /// costs less than a round trip asking which the server lacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockData>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockHasParams {
    pub hashes: Vec<Hash>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockHasResult {
    /// One flag per hash asked, in order.
    pub present: Vec<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockData {
    pub hash: Hash,
    pub data: Bytes,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockPutParams {
    pub blocks: Vec<BlockData>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockGetParams {
    pub hash: Hash,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockGetResult {
    pub data: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcParams {
    /// Keep unreferenced blocks younger than this (a client may be about to
    /// commit them); the server default when absent.
    #[serde(default)]
    pub min_age_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcResult {
    pub blocks_removed: u64,
    pub bytes_removed: u64,
}

/// Ask for change pushes on the mounted bucket, starting after `since`
/// (the last sequence number the client applied), or from now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscribeParams {
    #[serde(default)]
    pub since: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeResult {
    /// The bucket's latest sequence number now.
    pub seq: u64,
    /// `since` is older than the change log reaches: the client must
    /// revalidate everything it caches.
    pub reset: bool,
}

/// Server-to-client notification (no id): what changed, through `through`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushParams {
    /// Every change up to this sequence number is included (or covered by `reset`).
    pub through: u64,
    /// Changes were lost (the log was trimmed): revalidate everything.
    #[serde(default)]
    pub reset: bool,
    pub changes: Vec<Change>,
    /// Another client's change waits for this client (callbacks): answer
    /// with `push.ack` once applied. Pushes without it need no answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
}

/// One change, with the state it left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// An inode's attributes or content changed; `attr` is `None` once it is gone.
    Attr { seq: u64, ino: Ino, attr: Option<Attr> },
    /// A directory entry changed; `ino` is what it names now, if anything.
    Entry { seq: u64, parent: Ino, name: Name, ino: Option<Ino> },
}

/// Client-to-server notification: every push through this sequence
/// number is applied (caches updated, kernel caches invalidated).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushAckParams {
    pub through: u64,
    /// Inodes reported unlinked that the client holds open without the
    /// server knowing: register these opens (one entry per open) first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holding: Vec<Ino>,
}

/// Server counters since it started (block traffic, requests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsResult {
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Ask for the mounted bucket's delegation, and `inos` inode numbers this
/// client may give the nodes it creates. Granted while no other connection
/// has the bucket mounted; the holder answers namespace changes itself and
/// sends them in `fs.batch`. When another connection mounts the bucket, the
/// server sends the holder `fs.recall` (a notification) and waits until the
/// holder has sent what it queued and called `fs.delegate_return`. A holder
/// may call again for more inode numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DelegateParams {
    #[serde(default)]
    pub inos: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DelegateResult {
    pub granted: bool,
    /// Reserved inode numbers `first .. first + count` (count 0: none).
    pub first: Ino,
    pub count: u64,
}

/// Changes applied in order, each atomically, each stamped with the time
/// the client gave it (the time it already showed its kernel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchParams {
    pub ops: Vec<BatchOp>,
    /// Names the batch for good: the server applies a batch with a token
    /// once, and answers a repeat (a retry, or a replay by the holder's
    /// next mount after a crash) with the first outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Tokens of earlier batches whose outcomes the holder has received and
    /// logged: they will not be sent again, so the server forgets them.
    /// Those never named here (their holder crashed) are kept for weeks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forget: Vec<String>,
}

/// One change of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchOp {
    /// A file or directory (`node.kind`), with the client's inode number.
    Mknod {
        at: Timespec,
        node: NewNodeParams,
    },
    Unlink {
        at: Timespec,
        entry: EntryParams,
    },
    Rmdir {
        at: Timespec,
        entry: EntryParams,
    },
    Rename {
        at: Timespec,
        rename: RenameParams,
    },
    Link {
        at: Timespec,
        link: LinkParams,
    },
    Commit {
        at: Timespec,
        commit: SegmentCommitParams,
    },
    /// Mode, owner or times (never the size).
    SetAttr {
        at: Timespec,
        attr: SetAttrParams,
    },
}

/// What each op of a batch did, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResult {
    pub outcomes: Vec<BatchOutcome>,
}

/// One op's outcome: the attributes it left (for mknod and commit), or why
/// it failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BatchOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attr: Option<Attr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::RpcError>,
}
