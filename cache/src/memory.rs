//! A byte-bounded LRU cache of immutable blocks, safe to share across threads.

use crate::block::BlockBytes;
use lru::LruCache;
use restfs_proto::Hash;
use std::sync::{Arc, Mutex};

pub struct BlockCache {
    inner: Mutex<Inner>,
}

struct Inner {
    lru: LruCache<Hash, Arc<BlockBytes>>,
    bytes: usize,
    capacity: usize,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of block data.
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache { inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0, capacity }) }
    }

    pub fn get(&self, hash: &Hash) -> Option<Arc<BlockBytes>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).lru.get(hash).cloned()
    }

    pub fn insert(&self, hash: Hash, data: Arc<BlockBytes>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if data.len() > inner.capacity {
            return;
        }
        inner.bytes += data.len();
        if let Some(old) = inner.lru.put(hash, data) {
            inner.bytes -= old.len();
        }
        while inner.bytes > inner.capacity {
            match inner.lru.pop_lru() {
                Some((_, evicted)) => inner.bytes -= evicted.len(),
                None => break,
            }
        }
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let cache = BlockCache::new(100);
        let block = |b: u8| (Hash::of(&[b]), Arc::new(BlockBytes::from(vec![b; 40])));
        let (a, b, c) = (block(1), block(2), block(3));
        cache.insert(a.0, a.1.clone());
        cache.insert(b.0, b.1.clone());
        assert!(cache.get(&a.0).is_some()); // a is now most recent
        cache.insert(c.0, c.1.clone());
        assert_eq!(cache.bytes(), 80);
        assert!(cache.get(&b.0).is_none());
        assert!(cache.get(&a.0).is_some() && cache.get(&c.0).is_some());
    }

    #[test]
    fn oversized_blocks_are_not_cached() {
        let cache = BlockCache::new(10);
        cache.insert(Hash::of(b"x"), Arc::new(BlockBytes::from(vec![0; 11])));
        assert_eq!(cache.bytes(), 0);
    }
}
