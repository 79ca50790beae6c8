//! `restfs-cache`: the client's local caches.
//!
//! [`memory::BlockCache`] keeps recently used blocks in memory, bounded by
//! bytes. Blocks are immutable and addressed by hash, so a cached block can
//! never be stale; only its presence matters.

pub mod memory;

pub use memory::BlockCache;
