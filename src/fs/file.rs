//! One open regular file: its content as this client sees it.
//!
//! Content = committed block map (fetched per segment, cached while the
//! file's version is unchanged) + `pending` slots (uploaded, not yet
//! committed) + `dirty` blocks (written, only here). Reads layer them in
//! that order. A flush uploads dirty blocks and commits pending slots and
//! the size in one `seg.commit`, which makes them visible to every client.
//! Past a few dirty blocks, full ones are hashed, staged and sent in the
//! background while writes go on; they stay readable in `dirty` until
//! that is done, and a write meanwhile copies the block (copy on write).
//! A random writer's writes into blocks not in memory are kept as
//! `patches`, and its full blocks are staged without being sent
//! (`spilled`) until the commit, which sends each block once.
//!
//! Invariants: a dirty buffer holds the block's bytes from its start, at
//! most `block_size` of them; bytes of a block past its buffer or slot
//! length, and blocks with neither, read as zeros (holes).

use super::error::{FsError, Result};
use super::patch::{self, Patches};
use super::remote::{Remote, Staged};
use super::write_order::WriteOrder;
use restfs_cache::BlockBytes;
use restfs_proto::methods::{BatchOp, BlockData, SegmentCommitParams};
use restfs_proto::{Attr, BlockSlot, Bytes, Errno, Hash, Ino, Timespec};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

/// Blocks' worth of writes kept as patches (see [`super::patch`]) before
/// the fullest patched blocks are made whole (8 MiB with 1 MiB blocks).
const PATCH_BLOCKS: usize = 8;

/// Dirty blocks held in memory before full ones are uploaded early.
const DIRTY_LIMIT: usize = 8;

/// Uploads of early-staged blocks in flight per file: writes go on while
/// they travel, and wait (backpressure) when this many are under way.
const UPLOADS_IN_FLIGHT: usize = 3;

/// Uploads in flight across the mount past which a file waits for its own
/// to finish before starting another (each holds 8 blocks).
const MOUNT_UPLOADS_IN_FLIGHT: usize = 4;

/// Blocks fetched ahead of sequential reads.
const READ_AHEAD_BLOCKS: u64 = 8;

/// Where the bytes of one block's share of a read come from.
pub enum Part {
    /// Already here (dirty data, or zeros of a hole).
    Local(Vec<u8>),
    /// Bytes `from..to` of a stored block whose valid length is `len`.
    Stored { hash: Hash, len: u32, from: usize, to: usize },
}

/// Bytes `from..to` of a block whose valid bytes are `bytes`; zeros past them.
fn padded(bytes: &[u8], from: usize, to: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(to - from);
    append_padded(&mut out, bytes, from, to);
    out
}

/// Append what [`padded`] returns.
fn append_padded(out: &mut Vec<u8>, bytes: &[u8], from: usize, to: usize) {
    let avail = bytes.len().clamp(from, to);
    out.extend_from_slice(bytes.get(from..avail).unwrap_or_default());
    out.resize(out.len() + (to - avail), 0);
}

/// The bytes a read returns: its own buffer, or a range of one cached block
/// (the common case of a read within one block costs no copy).
pub enum ReadBuf {
    Owned(Vec<u8>),
    Shared(std::sync::Arc<restfs_cache::BlockBytes>, std::ops::Range<usize>),
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBuf::Owned(v) => v,
            ReadBuf::Shared(block, range) => &block[range.clone()],
        }
    }
}

impl ReadBuf {
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ReadBuf::Owned(v) => v,
            ReadBuf::Shared(..) => self.to_vec(),
        }
    }
}

/// Fetch the stored parts of a planned read (concurrently) and join them.
pub async fn assemble(r: &Remote, parts: Vec<Part>) -> Result<ReadBuf> {
    let fetched = futures_util::future::try_join_all(parts.iter().map(|p| async move {
        match p {
            Part::Stored { hash, .. } => r.block(*hash).await.map(Some),
            Part::Local(_) => Ok(None),
        }
    }))
    .await?;
    if let ([Part::Stored { len, from, to, .. }], [Some(data)]) = (&parts[..], &fetched[..])
        && *to <= (*len as usize).min(data.len())
    {
        return Ok(ReadBuf::Shared(data.clone(), *from..*to));
    }
    let mut out = Vec::new();
    for (part, data) in parts.into_iter().zip(fetched) {
        match part {
            Part::Local(bytes) if out.is_empty() => out = bytes,
            Part::Local(bytes) => out.extend_from_slice(&bytes),
            Part::Stored { len, from, to, .. } => {
                let data = data.expect("every stored part was fetched");
                append_padded(&mut out, &data[..(len as usize).min(data.len())], from, to);
            }
        }
    }
    Ok(ReadBuf::Owned(out))
}

pub struct File {
    pub ino: Ino,
    /// Taken through [`File::lock`].
    state: tokio::sync::Mutex<FileData>,
    /// Handles open on this file in this client.
    pub handles: AtomicU32,
    /// How many of them the server knows of (it keeps an unlinked file
    /// while any is registered). Opens answered from the cache register
    /// only when the file is about to lose its last name.
    pub registered: AtomicU32,
    /// The newest attributes a push brought that the state has not taken
    /// yet: set before the kernel's pages are invalidated, taken by the next
    /// [`File::lock`], so no read after the invalidation uses the old map
    /// (the state's lock may be held by a commit waiting on the server).
    pushed: std::sync::Mutex<Option<Attr>>,
}

pub struct FileData {
    pub attr: Attr,
    /// The ctime of the newest attributes the server gave (`attr.ctime`
    /// moves with local writes).
    pub server_ctime: Timespec,
    dirty: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Writes of a random writer into blocks not in `dirty`.
    patches: Patches,
    /// Dirty blocks an upload task is staging (still in `dirty`).
    staging: HashSet<u64>,
    pending: BTreeMap<u64, Option<(Hash, u32)>>,
    map: HashMap<u64, (Hash, u32)>,
    loaded: HashSet<u64>,
    map_version: u64,
    /// The committed content at `map_version` had no blocks at all, so
    /// every segment's map is known without asking.
    empty_base: bool,
    /// Size or content changed since the last commit.
    changed: bool,
    /// Where the next sequential read would start.
    next_read: u64,
    /// Blocks below this index were already fetched ahead.
    read_ahead_to: u64,
    /// Uploads in flight, oldest first; each gives its blocks back.
    uploads: VecDeque<tokio::task::JoinHandle<Upload>>,
    /// Staged blocks whose upload failed: sent again with the next one.
    unsent: Vec<Staged>,
    /// Full blocks of a file written out of order, moved from memory to
    /// the disk cache and sent with the next commit (sending them early
    /// would send a block again each time a random writer comes back to it).
    spilled: BTreeMap<u64, Hash>,
    /// Whether the file is written in order (see [`FileData::streaming`]).
    order: WriteOrder,
    /// Blocks pinned in the disk cache until the next commit succeeds.
    pinned: Vec<Hash>,
}

/// What an upload task did: dirty blocks it staged, and whether it sent
/// them (and the earlier `unsent` ones it took along).
struct Upload {
    sent: Result<()>,
    /// The dirty blocks it was given, and what it staged of them.
    indexes: Vec<u64>,
    staged: Vec<Staged>,
    resent: Vec<Staged>,
    /// It staged without sending (see `FileData::spilled`); what the disk
    /// cache could not take was sent.
    spill: bool,
}

/// A commit sent but not acknowledged, as journaled in the metadata cache.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Unacked {
    /// The file's version the commit applies to.
    pub base_version: u64,
    pub commit: SegmentCommitParams,
}

fn journal(r: &Remote, record: &Unacked) {
    let Some(meta) = &r.meta else { return };
    let stored = serde_json::to_string(record)
        .map_err(|e| e.to_string())
        .and_then(|text| meta.put_unacked(record.commit.ino, &text).map_err(|e| e.to_string()));
    if let Err(e) = stored {
        tracing::warn!("cannot journal the commit of inode {}: {e}", record.commit.ino);
    }
}

impl File {
    pub fn new(attr: Attr) -> File {
        File {
            ino: attr.ino,
            state: tokio::sync::Mutex::new(FileData {
                server_ctime: attr.ctime,
                attr: attr.clone(),
                dirty: BTreeMap::new(),
                patches: Patches::default(),
                staging: HashSet::new(),
                pending: BTreeMap::new(),
                map: HashMap::new(),
                loaded: HashSet::new(),
                map_version: attr.version,
                empty_base: attr.size == 0,
                changed: false,
                next_read: 0,
                read_ahead_to: 0,
                uploads: VecDeque::new(),
                unsent: Vec::new(),
                spilled: BTreeMap::new(),
                order: WriteOrder::default(),
                pinned: Vec::new(),
            }),
            handles: AtomicU32::new(0),
            registered: AtomicU32::new(0),
            pushed: std::sync::Mutex::new(None),
        }
    }

    /// The file's state, with what pushes reported meanwhile applied.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, FileData> {
        self.absorb_pushed(self.state.lock().await)
    }

    /// [`File::lock`] if nobody holds it.
    pub fn try_lock(&self) -> Option<tokio::sync::MutexGuard<'_, FileData>> {
        self.state.try_lock().ok().map(|st| self.absorb_pushed(st))
    }

    fn absorb_pushed<'a>(&self, mut st: tokio::sync::MutexGuard<'a, FileData>) -> tokio::sync::MutexGuard<'a, FileData> {
        if let Some(attr) = self.pushed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            st.refresh(attr);
        }
        st
    }

    /// Note attributes a push reported (applied at the next [`File::lock`]).
    pub fn pushed(&self, attr: Attr) {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if pushed.as_ref().is_none_or(|p| (p.version, p.ctime) <= (attr.version, attr.ctime)) {
            *pushed = Some(attr);
        }
    }
}

impl FileData {
    /// Take fresh attributes from the server, keeping local size and mtime
    /// while there are uncommitted changes.
    pub fn refresh(&mut self, fresh: Attr) {
        // A push or reply older than what we hold (e.g. generated before our
        // own truncate) must not undo it.
        if (fresh.version, fresh.ctime) < (self.attr.version, self.attr.ctime) {
            return;
        }
        let (size, mtime) = (self.attr.size, self.attr.mtime);
        self.server_ctime = fresh.ctime;
        self.attr = fresh;
        if self.changed {
            self.attr.size = size;
            self.attr.mtime = mtime;
        }
    }

    fn forget_map(&mut self) {
        self.read_ahead_to = 0;
        self.map.clear();
        self.loaded.clear();
        self.map_version = 0;
        self.empty_base = false;
    }

    /// The file is written sequentially: its full blocks are sent at once.
    fn streaming(&self) -> bool {
        self.order.sequential()
    }

    /// The committed or pending slot of block `idx`.
    async fn slot(&mut self, r: &Remote, idx: u64) -> Result<Option<(Hash, u32)>> {
        if let Some(p) = self.pending.get(&idx) {
            return Ok(*p);
        }
        self.load_segment(r, idx / r.segment_blocks).await?;
        Ok(self.map.get(&idx).copied())
    }

    /// Make sure the committed map of segment `seg` is in `map`.
    async fn load_segment(&mut self, r: &Remote, seg: u64) -> Result<()> {
        if self.map_version != self.attr.version {
            self.forget_map();
        }
        if !self.loaded.contains(&seg) && !self.empty_base {
            let (version, refs) = r.segment(self.attr.ino, seg, self.attr.version).await?;
            if version != self.attr.version && !self.loaded.is_empty() {
                self.forget_map();
            }
            self.attr.version = version;
            self.map_version = version;
            for b in refs {
                self.map.insert(b.index, (b.hash, b.len));
            }
            self.loaded.insert(seg);
        }
        Ok(())
    }

    /// The valid bytes of block `idx` as stored (committed or pending).
    async fn stored_block(&mut self, r: &Remote, idx: u64) -> Result<Vec<u8>> {
        match self.slot(r, idx).await? {
            None => Ok(Vec::new()),
            Some((hash, len)) => {
                let data = r.block(hash).await?;
                Ok(data[..(len as usize).min(data.len())].to_vec())
            }
        }
    }

    /// Plan a read of `size` bytes at `offset`: local bytes are copied
    /// now, stored blocks are named for [`assemble`] to fetch.
    pub async fn plan_read(&mut self, r: &Remote, offset: u64, size: u32) -> Result<Vec<Part>> {
        let end = self.attr.size.min(offset.saturating_add(size as u64));
        let bs = r.block_size;
        let mut parts = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let (from, to) = ((pos % bs) as usize, ((end - idx * bs).min(bs)) as usize);
            if self.patches.contains(idx) {
                // Read through, leaving the patches as they are (made
                // whole here, the block would stay in memory).
                let mut block = self.stored_block(r, idx).await?;
                patch::apply(&mut block, self.patches.get(idx).expect("checked above"));
                parts.push(Part::Local(padded(&block, from, to)));
                pos = idx * bs + to as u64;
                continue;
            }
            parts.push(match self.dirty.get(&idx) {
                Some(buf) => Part::Local(padded(buf.as_slice(), from, to)),
                None => match self.slot(r, idx).await? {
                    None => Part::Local(vec![0; to - from]),
                    Some((hash, len)) => Part::Stored { hash, len, from, to },
                },
            });
            pos = idx * bs + to as u64;
        }
        Ok(parts)
    }

    /// After a read at `offset`: if reads go sequentially, the stored
    /// blocks to fetch ahead of them (each block once).
    pub async fn read_ahead(&mut self, r: &Remote, offset: u64, size: u32) -> Vec<Hash> {
        // The kernel's readahead sends several reads at once, which may be
        // planned out of order: reads near the last one count as sequential.
        let window = READ_AHEAD_BLOCKS * r.block_size;
        let sequential = offset > 0 && offset + window >= self.next_read && offset <= self.next_read + window;
        let end = offset + size as u64;
        self.next_read = if sequential { self.next_read.max(end) } else { end };
        if !sequential {
            self.read_ahead_to = 0;
            return Vec::new();
        }
        let first = self.next_read.div_ceil(r.block_size).max(self.read_ahead_to);
        let last = (self.next_read / r.block_size + READ_AHEAD_BLOCKS).min(self.attr.size.div_ceil(r.block_size));
        let mut hashes = Vec::new();
        for idx in first..last {
            if !self.dirty.contains_key(&idx)
                && let Ok(Some((hash, _))) = self.slot(r, idx).await
            {
                hashes.push(hash);
            }
        }
        self.read_ahead_to = self.read_ahead_to.max(last);
        hashes
    }

    /// Write `data` at `offset`; `stamp`: set mtime and ctime to now.
    pub async fn write(&mut self, r: &Arc<Remote>, offset: u64, data: Vec<u8>, stamp: bool) -> Result<()> {
        let bs = r.block_size;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| FsError::new(Errno::EFBIG, "write past the largest offset"))?;
        if end > i64::MAX as u64 {
            return Err(FsError::new(Errno::EFBIG, "write past the largest offset"));
        }
        self.order.note(offset, end);
        if offset.is_multiple_of(bs) && data.len() as u64 == bs {
            // A whole block (what sequential writers send): it becomes the
            // dirty block as it is, with no copy.
            self.patches.take(offset / bs);
            self.supersede_spilled(r, offset / bs);
            self.dirty.insert(offset / bs, Arc::new(data));
        } else {
            self.write_into_blocks(r, offset, &data).await?;
        }
        let budget = PATCH_BLOCKS * bs as usize;
        if self.patches.bytes() > budget {
            self.make_whole(r, budget / 2).await?;
        }
        self.attr.size = self.attr.size.max(end);
        if stamp {
            let now = Timespec::now();
            self.attr.mtime = now;
            self.attr.ctime = now;
        }
        self.changed = true;
        if self.dirty.len().saturating_sub(self.staging.len()) > DIRTY_LIMIT {
            self.start_staging(r).await?;
        }
        Ok(())
    }

    /// Copy `data` into the dirty blocks it covers (read from the store
    /// first where it covers them in part), or, for a random writer, into
    /// patches of the blocks not dirty.
    async fn write_into_blocks(&mut self, r: &Remote, offset: u64, data: &[u8]) -> Result<()> {
        let bs = r.block_size;
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let from = (pos % bs) as usize;
            let to = ((end - idx * bs).min(bs)) as usize;
            let piece = &data[(pos - offset) as usize..][..to - from];
            pos = idx * bs + to as u64;
            if !self.dirty.contains_key(&idx) {
                let whole = from == 0 && to as u64 == bs;
                if !whole && !self.streaming() {
                    self.patches.add(idx, from as u32, piece);
                    if let Some(block) = self.patches.take_whole(idx, bs as u32) {
                        self.supersede_spilled(r, idx);
                        self.dirty.insert(idx, Arc::new(block));
                    }
                    continue;
                }
                let base = if whole {
                    self.patches.take(idx);
                    Vec::new()
                } else {
                    self.current_block(r, idx).await?
                };
                self.supersede_spilled(r, idx);
                self.dirty.insert(idx, Arc::new(base));
            }
            // Copied first if an upload task still reads it.
            let buf = Arc::make_mut(self.dirty.get_mut(&idx).expect("inserted above"));
            if buf.len() < to {
                buf.resize(to, 0);
            }
            buf[from..to].copy_from_slice(piece);
        }
        Ok(())
    }

    /// The bytes of block `idx` not in `dirty`: as stored, with its
    /// patches laid over (and taken).
    async fn current_block(&mut self, r: &Remote, idx: u64) -> Result<Vec<u8>> {
        let mut block = self.stored_block(r, idx).await?;
        if let Some(ranges) = self.patches.take(idx) {
            patch::apply(&mut block, &ranges);
        }
        Ok(block)
    }

    /// Make patched block `idx` whole, in `dirty`.
    async fn unpatch(&mut self, r: &Remote, idx: u64) -> Result<()> {
        let block = self.current_block(r, idx).await?;
        self.supersede_spilled(r, idx);
        self.dirty.insert(idx, Arc::new(block));
        Ok(())
    }

    /// Make the fullest patched blocks whole until at most `keep` bytes of
    /// patches are left, staging as they pile up.
    async fn make_whole(&mut self, r: &Arc<Remote>, keep: usize) -> Result<()> {
        while self.patches.bytes() > keep
            && let Some(idx) = self.patches.fullest()
        {
            self.unpatch(r, idx).await?;
            if self.dirty.len().saturating_sub(self.staging.len()) > DIRTY_LIMIT {
                self.start_staging(r).await?;
            }
        }
        Ok(())
    }

    /// Block `idx` is written again: its spilled copy is of no more use.
    fn supersede_spilled(&mut self, r: &Remote, idx: u64) {
        if let Some(old) = self.spilled.remove(&idx)
            && let Some(i) = self.pinned.iter().position(|h| *h == old)
        {
            self.pinned.swap_remove(i);
            r.release([old]);
        }
    }

    /// Stage every dirty block in the disk cache and move them to
    /// `pending`; returns them, to be sent. Uploads in flight finish first.
    async fn stage_dirty(&mut self, r: &Arc<Remote>) -> Result<Vec<Staged>> {
        if let Err(e) = self.finish_uploads(r).await {
            // Their blocks are in `unsent`, sent again with the rest.
            tracing::debug!("upload of inode {}: {e}", self.attr.ino);
        }
        let blocks = std::mem::take(&mut self.dirty);
        let (holes, data): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|(_, b)| b.is_empty());
        for (idx, _) in holes {
            self.pending.insert(idx, None);
        }
        let mut staged = Vec::new();
        for block in r.stage(data).await? {
            self.pending.insert(block.index, Some((block.hash, block.data.len() as u32)));
            if block.pinned {
                self.pinned.push(block.hash);
            }
            staged.push(block);
        }
        Ok(staged)
    }

    /// Hash and stage the dirty blocks in the background, and send them
    /// if the file is written sequentially (else they are spilled): all
    /// but the one the last write ended in (a sequential writer is still
    /// filling it) and those already under way.
    async fn start_staging(&mut self, r: &Arc<Remote>) -> Result<()> {
        while self.uploads.front().is_some_and(|t| t.is_finished()) {
            self.finish_oldest_upload(r).await?;
        }
        // The block the last write ended in.
        let last = self.order.last_end().saturating_sub(1) / r.block_size;
        let chosen: Vec<(u64, Arc<Vec<u8>>)> =
            self.dirty.iter().filter(|(idx, _)| **idx != last && !self.staging.contains(idx)).map(|(i, b)| (*i, b.clone())).collect();
        let mut blocks = Vec::new();
        for (idx, data) in chosen {
            if data.is_empty() {
                // A hole: nothing to send.
                self.dirty.remove(&idx);
                self.pending.insert(idx, None);
            } else {
                self.staging.insert(idx);
                blocks.push((idx, data));
            }
        }
        if self.streaming() {
            self.spawn_upload(r, blocks, Vec::new());
        } else {
            self.spawn_spill(r, blocks);
        }
        // Backpressure: past its own bound, or past the mount's while it has
        // more than one under way (so files written at once share the room).
        // A random writer's blocks written again while staged are copied,
        // and stay dirty: bound them all, staged or not.
        while self.uploads.len() > UPLOADS_IN_FLIGHT
            || (self.uploads.len() > 1 && r.metrics.uploads_in_flight() > MOUNT_UPLOADS_IN_FLIGHT as i64)
            || (!self.uploads.is_empty() && !self.streaming() && self.dirty.len() > 2 * DIRTY_LIMIT)
        {
            self.finish_oldest_upload(r).await?;
        }
        Ok(())
    }

    /// Stage `blocks` (dirty), then send them with `staged` and the earlier
    /// unsent blocks, in a task.
    fn spawn_upload(&mut self, r: &Arc<Remote>, blocks: Vec<(u64, Arc<Vec<u8>>)>, mut staged: Vec<Staged>) {
        staged.append(&mut self.unsent);
        if blocks.is_empty() && staged.is_empty() {
            return;
        }
        let r = r.clone();
        r.metrics.uploads(1);
        self.uploads.push_back(tokio::spawn(async move {
            let indexes = blocks.iter().map(|(idx, _)| *idx).collect();
            let done = match r.stage(blocks).await {
                Ok(fresh) => {
                    let all: Vec<Staged> = fresh.iter().chain(&staged).cloned().collect();
                    Upload { sent: r.send(&all).await, indexes, staged: fresh, resent: staged, spill: false }
                }
                Err(e) => Upload { sent: Err(e), indexes, staged: Vec::new(), resent: staged, spill: false },
            };
            r.metrics.uploads(-1);
            done
        }));
    }

    /// Stage `blocks` (dirty) in a task, without sending them.
    fn spawn_spill(&mut self, r: &Arc<Remote>, blocks: Vec<(u64, Arc<Vec<u8>>)>) {
        if blocks.is_empty() {
            return;
        }
        let r = r.clone();
        r.metrics.uploads(1);
        self.uploads.push_back(tokio::spawn(async move {
            let indexes = blocks.iter().map(|(idx, _)| *idx).collect();
            let done = match r.stage(blocks).await {
                Ok(staged) => {
                    // Blocks the disk cache could not take go now, not to stay in memory.
                    let homeless: Vec<Staged> = staged.iter().filter(|b| !b.pinned).cloned().collect();
                    Upload { sent: r.send(&homeless).await, indexes, staged, resent: Vec::new(), spill: true }
                }
                Err(e) => Upload { sent: Err(e), indexes, staged: Vec::new(), resent: Vec::new(), spill: true },
            };
            r.metrics.uploads(-1);
            done
        }));
    }

    /// Wait for the oldest upload; what it staged leaves `dirty` for
    /// `pending` (unless written again meanwhile).
    async fn finish_oldest_upload(&mut self, r: &Remote) -> Result<()> {
        let Some(task) = self.uploads.pop_front() else { return Ok(()) };
        let done = task.await.map_err(|e| FsError::new(Errno::EIO, format!("upload task failed: {e}")))?;
        for idx in &done.indexes {
            self.staging.remove(idx);
        }
        let mut moved = Vec::new();
        for b in done.staged {
            let spilled = done.spill && b.pinned;
            let unchanged = matches!((&*b.data, self.dirty.get(&b.index)), (BlockBytes::Shared(s), Some(d)) if Arc::ptr_eq(s, d));
            if !unchanged {
                // Written again meanwhile: no commit will name this copy.
                if b.pinned {
                    r.release([b.hash]);
                }
                continue;
            }
            if b.pinned {
                self.pinned.push(b.hash);
            }
            self.dirty.remove(&b.index);
            self.pending.insert(b.index, Some((b.hash, b.data.len() as u32)));
            if spilled {
                // Out of memory: `pending` names it, the disk cache holds it.
                self.spilled.insert(b.index, b.hash);
            } else {
                moved.push(b);
            }
        }
        if done.sent.is_err() {
            // Sent again with the next upload or the commit.
            self.unsent.extend(moved);
            self.unsent.extend(done.resent);
        }
        done.sent
    }

    /// Wait for every upload; the first error wins.
    async fn finish_uploads(&mut self, r: &Remote) -> Result<()> {
        let mut first = Ok(());
        while !self.uploads.is_empty() {
            let done = self.finish_oldest_upload(r).await;
            if first.is_ok() {
                first = done;
            }
        }
        first
    }

    /// Send `blocks` and wait for every upload; the first error wins.
    async fn send_all(&mut self, r: &Arc<Remote>, blocks: Vec<Staged>) -> Result<()> {
        self.spawn_upload(r, Vec::new(), blocks);
        self.finish_uploads(r).await
    }

    /// Extend the size without writing (fallocate); the new range reads as zeros.
    pub fn extend(&mut self, size: u64) {
        if size > self.attr.size {
            self.attr.size = size;
            self.attr.ctime = Timespec::now();
            self.changed = true;
        }
    }

    /// Make bytes `offset..end` below the size read as zeros (fallocate's
    /// PUNCH_HOLE and ZERO_RANGE): the blocks the range covers whole become
    /// holes, its partial blocks at either edge are zeroed.
    pub async fn zero_range(&mut self, r: &Arc<Remote>, offset: u64, end: u64) -> Result<()> {
        let end = end.min(self.attr.size);
        if offset >= end {
            return Ok(());
        }
        let bs = r.block_size;
        let (first_whole, past_whole) = (offset.div_ceil(bs), end / bs);
        if first_whole >= past_whole {
            self.write_into_blocks(r, offset, &vec![0; (end - offset) as usize]).await?;
        } else {
            if offset < first_whole * bs {
                self.write_into_blocks(r, offset, &vec![0; (first_whole * bs - offset) as usize]).await?;
            }
            if past_whole * bs < end {
                self.write_into_blocks(r, past_whole * bs, &vec![0; (end - past_whole * bs) as usize]).await?;
            }
            for idx in self.blocks_within(r, first_whole..past_whole).await? {
                // An empty dirty block is a hole (see `stage_dirty`).
                self.patches.take(idx);
                self.supersede_spilled(r, idx);
                self.dirty.insert(idx, Arc::new(Vec::new()));
            }
        }
        let now = Timespec::now();
        self.attr.mtime = now;
        self.attr.ctime = now;
        self.changed = true;
        Ok(())
    }

    /// The blocks in `range` that hold anything, stored or written here
    /// (the rest are holes already): a hole punched through a large sparse
    /// file costs what it removes, not a slot per block it spans.
    async fn blocks_within(&mut self, r: &Remote, range: std::ops::Range<u64>) -> Result<BTreeSet<u64>> {
        if range.is_empty() {
            return Ok(BTreeSet::new());
        }
        // Load the committed map of every segment the range touches, all at
        // one version: a new version met on the way drops the segments
        // loaded before it, so go round again until none was dropped.
        let segments = range.start / r.segment_blocks..=(range.end - 1) / r.segment_blocks;
        for round in 0.. {
            for seg in segments.clone() {
                self.load_segment(r, seg).await?;
            }
            if self.empty_base || segments.clone().all(|seg| self.loaded.contains(&seg)) {
                break;
            }
            if round == 16 {
                return Err(FsError::new(Errno::EBUSY, format!("inode {} keeps changing on the server", self.attr.ino)));
            }
        }
        let within = |idx: &u64| range.contains(idx);
        let mut found: BTreeSet<u64> = self.map.keys().copied().filter(within).collect();
        found.extend(self.pending.iter().filter(|(idx, b)| b.is_some() && within(idx)).map(|(idx, _)| *idx));
        found.extend(self.dirty.range(range.clone()).filter(|(_, b)| !b.is_empty()).map(|(idx, _)| *idx));
        found.extend(self.spilled.range(range.clone()).map(|(idx, _)| *idx));
        found.extend(self.patches.indexes(range.clone()));
        Ok(found)
    }

    /// Send the spilled blocks, a few at a time from the disk cache.
    async fn send_spilled(&mut self, r: &Remote) -> Result<()> {
        const AT_ONCE: usize = 16;
        while !self.spilled.is_empty() {
            let some: Vec<(u64, Hash)> = self.spilled.iter().take(AT_ONCE).map(|(i, h)| (*i, *h)).collect();
            let mut staged = Vec::with_capacity(some.len());
            for (index, hash) in &some {
                let data = r.ring.as_ref().and_then(|ring| ring.get(hash)).ok_or_else(|| {
                    FsError::new(Errno::EIO, format!("block {index} of inode {} left the disk cache before it was sent", self.attr.ino))
                })?;
                staged.push(Staged { index: *index, hash: *hash, data: Arc::new(data), pinned: false });
            }
            r.send(&staged).await?;
            for (index, _) in some {
                self.spilled.remove(&index);
            }
        }
        Ok(())
    }

    /// Publish local changes: stage, journal the commit, send the blocks,
    /// then commit atomically. Returns whether anything was committed.
    pub async fn flush(&mut self, r: &Arc<Remote>) -> Result<bool> {
        if !self.changed {
            return Ok(false);
        }
        self.make_whole(r, 0).await?;
        if let Err(e) = self.finish_uploads(r).await {
            // Their blocks are in `unsent`, sent again with the rest.
            tracing::debug!("upload of inode {}: {e}", self.attr.ino);
        }
        // Spills finished above add to these.
        self.send_spilled(r).await?;
        let staged = self.stage_dirty(r).await?;
        // Small blocks ride with the commit: one round trip instead of three.
        let (inline, staged): (Vec<Staged>, Vec<Staged>) = staged.into_iter().partition(|b| b.data.len() <= super::remote::SMALL_BLOCK);
        let size = self.attr.size;
        let slots: Vec<BlockSlot> = self
            .pending
            .iter()
            .filter(|(idx, _)| **idx * r.block_size < size)
            .map(|(idx, b)| BlockSlot { index: *idx, block: *b })
            .collect();
        let mut params = SegmentCommitParams { ino: self.attr.ino, size, slots, mtime: Some(self.attr.mtime), blocks: Vec::new() };
        let before = self.attr.version;
        let record = Unacked { base_version: before, commit: params.clone() };
        for b in &inline {
            r.cache.insert(b.hash, b.data.clone());
            r.metrics.add(super::metrics::BLOCKS_UPLOADED, 1);
            r.metrics.add(super::metrics::BYTES_UPLOADED, b.data.len() as u64);
            params.blocks.push(BlockData { hash: b.hash, data: Bytes(b.data.to_vec()) });
        }
        // Under the delegation a commit of small blocks only is queued
        // without waiting, logged by the delegation's journal (only once
        // every block it names is on the server: no upload is pending).
        let behind = if staged.is_empty() && self.uploads.is_empty() && self.unsent.is_empty() {
            r.delegation.room().await;
            self.commit_behind(r, params, None)
        } else {
            Err(params)
        };
        let fresh = match behind {
            Ok(fresh) => fresh,
            Err(params) => {
                // Until the server acknowledges, the commit is journaled (its
                // blocks are pinned in the disk cache): a later mount completes it.
                journal(r, &record);
                self.send_all(r, staged).await?;
                match self.commit_behind(r, params, Some(record)) {
                    Ok(fresh) => fresh,
                    Err(params) => self.commit_now(r, params, inline).await?,
                }
            }
        };
        r.delegation.logged_or_sent().await;
        // Our commit is the only change since `before`: the map stays valid.
        let map_still_valid = fresh.version == before + 1 && self.map_version == before;
        for (idx, slot) in std::mem::take(&mut self.pending) {
            match slot {
                Some(s) if map_still_valid && idx * r.block_size < size => {
                    self.map.insert(idx, s);
                }
                _ => {
                    self.map.remove(&idx);
                }
            }
        }
        if map_still_valid {
            self.map.retain(|idx, _| idx * r.block_size < size);
            if !size.is_multiple_of(r.block_size)
                && let Some((_, len)) = self.map.get_mut(&(size / r.block_size))
            {
                *len = (*len).min((size % r.block_size) as u32);
            }
            self.map_version = fresh.version;
            self.publish_map(r, size);
        } else {
            self.forget_map();
        }
        self.changed = false;
        self.server_ctime = fresh.ctime;
        self.attr = fresh;
        Ok(true)
    }

    /// Commit and wait for the server's answer.
    async fn commit_now(&mut self, r: &Arc<Remote>, params: SegmentCommitParams, inline: Vec<Staged>) -> Result<Attr> {
        let committed = r.commit(params).await;
        if committed.is_err() {
            // Not stored: they go with the next upload.
            self.unsent.extend(inline);
        }
        let fresh = committed.map_err(|e| {
            if e.as_errno() == Errno::EAGAIN {
                FsError::new(Errno::EIO, format!("commit of inode {} lost blocks the server collected: {e}", self.attr.ino))
            } else {
                FsError::from(e)
            }
        })?;
        r.release(std::mem::take(&mut self.pinned));
        if let Some(meta) = &r.meta
            && let Err(e) = meta.clear_unacked(self.attr.ino)
        {
            tracing::warn!("{e}");
        }
        Ok(fresh)
    }

    /// Queue the commit behind the delegation's other changes, without
    /// waiting: returns the attributes it will give the file. Gives the
    /// commit back when the delegation is not held. `record`: the commit as
    /// journaled, cleared from the journal once acknowledged.
    fn commit_behind(
        &mut self,
        r: &Arc<Remote>,
        params: SegmentCommitParams,
        record: Option<Unacked>,
    ) -> std::result::Result<Attr, SegmentCommitParams> {
        let at = Timespec::now();
        let mtime = params.mtime.unwrap_or(at);
        let fresh = Attr { size: params.size, mtime, ctime: at.max(mtime), version: self.attr.version + 1, ..self.attr.clone() };
        let (remote, pinned) = (r.clone(), &mut self.pinned);
        let mut params = Some(params);
        let queued = r.delegation.local(|l| {
            let commit = params.take()?;
            let pinned = std::mem::take(pinned);
            let then: super::delegation::Then = Box::new(move |outcome| {
                // Refused, the blocks stay pinned for the journal's next mount.
                if outcome.is_ok() {
                    remote.release(pinned);
                    if let (Some(meta), Some(record)) = (&remote.meta, record) {
                        let text = serde_json::to_string(&record).unwrap_or_default();
                        if let Err(e) = meta.clear_unacked_if(record.commit.ino, &text) {
                            tracing::warn!("{e}");
                        }
                    }
                }
            });
            l.push(BatchOp::Commit { at, commit }, Some(then));
            Some(())
        });
        match (queued, params) {
            (Some(()), _) => Ok(fresh),
            (None, Some(params)) => Err(params),
            (None, None) => unreachable!("the commit is taken only when queued"),
        }
    }

    /// Let go of blocks pinned for a commit that will not happen here
    /// (the last handle is gone; the journal still names them).
    pub fn abandon(&mut self, r: &Remote) {
        r.release(std::mem::take(&mut self.pinned));
    }

    /// Store the block map of every segment this client knows whole, under
    /// the new version, so a later mount needs no `seg.get` for it.
    fn publish_map(&self, r: &Remote, size: u64) {
        let Some(meta) = &r.meta else { return };
        let per = r.segment_blocks;
        let last = size.div_ceil(r.block_size).div_ceil(per);
        // Segments holding blocks or loaded from the server (a sparse file's
        // empty stretches are not worth a row each).
        let mut segments: Vec<u64> = self.map.keys().map(|i| i / per).chain(self.loaded.iter().copied()).filter(|s| *s < last).collect();
        segments.sort_unstable();
        segments.dedup();
        for seg in segments.into_iter().filter(|s| self.empty_base || self.loaded.contains(s)) {
            let mut refs: Vec<restfs_proto::BlockRef> = (seg * per..(seg + 1) * per)
                .filter_map(|index| self.map.get(&index).map(|(hash, len)| restfs_proto::BlockRef { index, hash: *hash, len: *len }))
                .collect();
            refs.sort_by_key(|b| b.index);
            if let Err(e) = meta.put_block_map(self.attr.ino, seg, self.map_version, &refs) {
                tracing::warn!("{e}");
            }
        }
    }

    /// After a server-side truncate: drop every cached slot.
    pub fn truncated(&mut self, fresh: Attr) {
        self.forget_map();
        self.server_ctime = fresh.ctime;
        self.attr = fresh;
    }

    pub fn has_unflushed(&self) -> bool {
        self.changed
    }
}
