//! `restfs-cache`: the client's local caches.
//!
//! Blocks are immutable and addressed by hash, so a cached block can never
//! be stale; only its presence (and integrity) matters.
//! - [`ring::BlockRing`]: the on-disk circular block cache (persistent,
//!   bounded, CLOCK eviction, verified reads).
//! - [`block::BlockBytes`]: a block's bytes, on the heap or mapped from the ring.
//! - [`memory::BlockCache`]: a small in-memory LRU in front of it.
//! - [`meta::MetaCache`]: the persistent metadata cache (SQLite).

pub mod block;
pub mod memory;
pub mod meta;
pub mod ring;

pub use block::BlockBytes;
pub use memory::BlockCache;
pub use meta::{MetaCache, MetaCacheError};
pub use ring::{BlockRing, CacheError, RingStats};
