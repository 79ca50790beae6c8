//! Immutable block bytes, shared without copying: either on the heap, or
//! mapped straight from the on-disk ring, whose record then stays pinned
//! (safe from eviction) for as long as the bytes are alive.

use crate::ring::MappedRecord;

pub enum BlockBytes {
    Heap(Vec<u8>),
    /// Shared with its writer (a dirty block being staged).
    Shared(std::sync::Arc<Vec<u8>>),
    Mapped(MappedRecord),
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Heap(v) => v,
            BlockBytes::Shared(v) => v,
            BlockBytes::Mapped(m) => m.bytes(),
        }
    }
}

impl From<Vec<u8>> for BlockBytes {
    fn from(v: Vec<u8>) -> BlockBytes {
        BlockBytes::Heap(v)
    }
}

impl std::fmt::Debug for BlockBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if matches!(self, BlockBytes::Mapped(_)) { "mapped" } else { "heap" };
        write!(f, "BlockBytes({kind}, {} bytes)", self.len())
    }
}
