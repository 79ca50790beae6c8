//! Data movement between the core and the server: fetching blocks (through
//! the block cache, hash-checked) and block maps, and uploading blocks
//! (hash, batched `has`, then `put` of only the missing ones).

use super::error::{FsError, Result};
use super::metrics;
use restfs_cache::{BlockBytes, BlockCache, BlockRing};
use restfs_proto::methods::{
    BlockData, BlockGet, BlockGetParams, BlockHas, BlockHasParams, BlockPut, BlockPutParams, SegmentCommit, SegmentCommitParams,
    SegmentGet, SegmentGetParams,
};
use restfs_proto::{BlockRef, Bytes, Errno, Hash, Ino};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

use crate::client::Link;

/// Most bytes sent in one `block.put` call.
const PUT_BATCH_BYTES: usize = 8 << 20;

/// Up to this many bytes are hashed and staged on the calling thread.
const STAGE_IN_PLACE: usize = 128 << 10;

/// `block.put` calls in flight across the mount. Each holds a copy of its
/// blocks being encoded and sent; more at once only adds memory (measured:
/// four files written at once reached 469 MiB resident without a limit).
pub const PUTS_IN_FLIGHT: usize = 4;

/// Blocks up to this size travel with their commit (no `has` first).
pub const SMALL_BLOCK: usize = 64 << 10;

pub struct Remote {
    pub link: Link,
    /// Changes answered locally under a delegation, on their way.
    pub delegation: Arc<super::delegation::Delegation>,
    /// Small in-memory cache in front of the ring.
    pub cache: BlockCache,
    /// The on-disk block cache, when the mount has one.
    pub ring: Option<Arc<BlockRing>>,
    /// Block maps per data version (immutable, so never stale).
    pub meta: Option<Arc<restfs_cache::MetaCache>>,
    pub block_size: u64,
    pub segment_blocks: u64,
    pub metrics: super::metrics::Metrics,
    /// Blocks being fetched: a second reader (or a prefetch) waits for the
    /// first fetch instead of starting its own.
    pub inflight: Mutex<HashMap<Hash, Arc<Fetch>>>,
    /// Room for `block.put` calls (see [`PUTS_IN_FLIGHT`]).
    pub put_slots: tokio::sync::Semaphore,
}

type Fetch = OnceCell<Result<Arc<BlockBytes>>>;

/// An uploaded block: its slot index, address and length.
pub type Uploaded = (u64, Hash, u32);

impl Remote {
    /// The link, for a request that must come after the changes queued
    /// under the delegation.
    pub async fn ordered(&self) -> &Link {
        self.delegation.drained().await;
        &self.link
    }

    /// Commit and wait for the server's answer, after the changes queued
    /// under the delegation (`FileData::commit_behind` queues one instead).
    pub async fn commit(&self, params: SegmentCommitParams) -> std::result::Result<restfs_proto::Attr, restfs_proto::RpcError> {
        self.ordered().await.call::<SegmentCommit>(params).await
    }

    /// A block's bytes, from the cache or the server; verified against its hash.
    pub async fn block(&self, hash: Hash) -> Result<Arc<BlockBytes>> {
        if let Some(data) = self.cache.get(&hash) {
            self.metrics.add(metrics::MEMORY_HITS, 1);
            return Ok(data);
        }
        let fetch = self.inflight.lock().unwrap_or_else(|p| p.into_inner()).entry(hash).or_default().clone();
        let got = fetch.get_or_init(|| self.fetch(hash)).await.clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(&hash).is_some_and(|f| Arc::ptr_eq(f, &fetch)) {
            inflight.remove(&hash);
        }
        got
    }

    /// Fetch a block into the memory cache ahead of a read.
    pub async fn prefetch(&self, hash: Hash) {
        if let Err(e) = self.block(hash).await {
            tracing::debug!("prefetch of block {hash}: {e}");
        }
    }

    /// A block from the disk cache, else the server.
    async fn fetch(&self, hash: Hash) -> Result<Arc<BlockBytes>> {
        if let Some(ring) = &self.ring {
            let ring = ring.clone();
            // The ring verifies what it reads; a corrupt copy is a miss.
            if let Ok(Some(data)) = tokio::task::spawn_blocking(move || ring.get(&hash)).await {
                self.metrics.add(metrics::RING_HITS, 1);
                let data = Arc::new(data);
                self.cache.insert(hash, data.clone());
                return Ok(data);
            }
        }
        let data = self.link.call::<BlockGet>(BlockGetParams { hash }).await?.data.0;
        self.metrics.add(metrics::BLOCKS_FETCHED, 1);
        self.metrics.add(metrics::BYTES_FETCHED, data.len() as u64);
        let checked = tokio::task::spawn_blocking(move || (Hash::of(&data) == hash).then_some(data)).await.ok().flatten();
        let Some(data) = checked else {
            return Err(FsError::new(Errno::EIO, format!("block {hash} arrived corrupt")));
        };
        let data = Arc::new(BlockBytes::Heap(data));
        self.keep(hash, data.clone()).await;
        Ok(data)
    }

    /// Cache a block in memory and on disk.
    async fn keep(&self, hash: Hash, data: Arc<BlockBytes>) {
        self.cache.insert(hash, data.clone());
        if let Some(ring) = &self.ring {
            let ring = ring.clone();
            let stored = tokio::task::spawn_blocking(move || ring.insert(&hash, &data, false)).await;
            if let Ok(Err(e)) = stored {
                tracing::warn!("block cache: {e}");
            }
        }
    }

    /// The block map of one segment of a file, and the file's version:
    /// from the metadata cache when it holds `version`'s, else the server.
    pub async fn segment(&self, ino: Ino, segment: u64, version: u64) -> Result<(u64, Vec<BlockRef>)> {
        if let Some(m) = &self.meta
            && let Ok(Some(refs)) = m.block_map(ino, segment, version)
        {
            return Ok((version, refs));
        }
        let r = self.ordered().await.call::<SegmentGet>(SegmentGetParams { ino, segment }).await?;
        if let Some(m) = &self.meta
            && let Err(e) = m.put_block_map(ino, segment, r.version, &r.blocks)
        {
            tracing::warn!("{e}");
        }
        Ok((r.version, r.blocks))
    }

    /// Hash blocks and stage them in the disk cache, pinned until
    /// [`Remote::release`]: from here on they survive a crash of this
    /// client or an outage, waiting to be sent.
    pub async fn stage(&self, blocks: Vec<(u64, Arc<Vec<u8>>)>) -> Result<Vec<Staged>> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let total: usize = blocks.iter().map(|(_, d)| d.len()).sum();
        let ring = self.ring.clone();
        let stage_all = move || -> Vec<Staged> {
            blocks
                .into_iter()
                .map(|(index, data)| {
                    let hash = Hash::of(&data);
                    let pinned = ring.as_ref().is_some_and(|ring| match ring.insert(&hash, &data, true) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!("block cache: cannot stage block {hash}: {e}");
                            false
                        }
                    });
                    Staged { index, hash, data: Arc::new(BlockBytes::Shared(data)), pinned }
                })
                .collect()
        };
        // A little data costs less in place than a hand-off to another thread.
        if total <= STAGE_IN_PLACE {
            return Ok(stage_all());
        }
        tokio::task::spawn_blocking(stage_all).await.map_err(|e| FsError::new(Errno::EIO, format!("hashing failed: {e}")))
    }

    /// Release the pins [`Remote::stage`] took, once the blocks are committed.
    pub fn release(&self, hashes: impl IntoIterator<Item = Hash>) {
        if let Some(ring) = &self.ring {
            for hash in hashes {
                ring.unpin(&hash);
            }
        }
    }

    /// Send staged blocks; only those the server lacks travel.
    pub async fn send(&self, staged: &[Staged]) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        let present = self.link.call::<BlockHas>(BlockHasParams { hashes: staged.iter().map(|b| b.hash).collect() }).await?.present;
        if present.len() != staged.len() {
            return Err(FsError::new(Errno::EIO, "server answered block.has with the wrong count"));
        }
        // Taken before the first copy of a block to send.
        let mut slot = None;
        let mut batch: Vec<BlockData> = Vec::new();
        let mut batch_bytes = 0;
        for (block, there) in staged.iter().zip(present) {
            self.cache.insert(block.hash, block.data.clone());
            if there || batch.iter().any(|b| b.hash == block.hash) {
                self.metrics.add(metrics::BLOCKS_DEDUPLICATED, 1);
                self.metrics.add(metrics::BYTES_DEDUPLICATED, block.data.len() as u64);
                continue;
            }
            if slot.is_none() {
                slot = Some(self.put_slots.acquire().await.map_err(|_| FsError::new(Errno::EIO, "block uploads closed"))?);
            }
            self.metrics.add(metrics::BLOCKS_UPLOADED, 1);
            self.metrics.add(metrics::BYTES_UPLOADED, block.data.len() as u64);
            batch_bytes += block.data.len();
            batch.push(BlockData { hash: block.hash, data: Bytes(block.data.to_vec()) });
            if batch_bytes >= PUT_BATCH_BYTES {
                self.link.call::<BlockPut>(BlockPutParams { blocks: std::mem::take(&mut batch) }).await?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.link.call::<BlockPut>(BlockPutParams { blocks: batch }).await?;
        }
        Ok(())
    }
}

/// A block hashed and staged in the disk cache, not yet committed.
#[derive(Clone)]
pub struct Staged {
    pub index: u64,
    pub hash: Hash,
    pub data: Arc<BlockBytes>,
    /// The disk cache took it and holds a pin on it for us (released once
    /// a commit names it); it may not have room.
    pub pinned: bool,
}
