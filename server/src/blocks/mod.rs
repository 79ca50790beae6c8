//! The block store: immutable blocks addressed by their SHA-256.
//!
//! Blocks above [`INLINE_MAX`] bytes live here; smaller ones are kept inline
//! by the metadata store, so small files cost no file create or fsync of
//! their own. A `put` returns only once the block is durable, so a commit
//! naming it can never outlive it. Every backend passes [`conformance`].

pub mod dir;

#[cfg(test)]
pub mod conformance;

use crate::error::Result;
use restfs_proto::Hash;

/// Largest block kept inline in the metadata store: 64 KiB.
pub const INLINE_MAX: usize = 64 << 10;

pub trait BlockStore: Send + Sync {
    /// Store a block durably; storing one already present is a no-op.
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<()>;
    /// A block's bytes; ENOENT if absent.
    fn get(&self, hash: &Hash) -> Result<Vec<u8>>;
    fn has(&self, hash: &Hash) -> Result<bool>;
    /// Remove a block; removing an absent one is a no-op.
    fn delete(&self, hash: &Hash) -> Result<()>;
    /// Free and total bytes of the space behind the store.
    fn space(&self) -> Result<(u64, u64)>;
}
