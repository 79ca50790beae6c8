//! The on-disk circular block cache.
//!
//! One file of fixed size (the capacity) holds records laid end to end:
//! a 64-byte header (magic, sequence number, hash, length, block checksum,
//! header checksum) then the block, padded to 4 KiB. New records go at the head, which
//! sweeps around the ring; a record in the way is evicted unless it was
//! used since the head last passed (CLOCK: it keeps its place and loses
//! its mark) or is pinned. A hit costs O(1): set the mark.
//!
//! Integrity and crash safety without fsync: a block's SHA-256 address is
//! checked before it enters the ring (by the caller: fetched blocks are
//! verified, written ones hashed), and the record carries an XXH3-64
//! checksum of the bytes written, verified on every read (at memory speed,
//! where re-hashing SHA-256 would halve cold-read throughput). A torn,
//! overwritten or corrupted record is therefore a miss, never wrong data
//! (it is dropped and counted as corrupt). The
//! index is rebuilt at open by walking record headers; the head resumes
//! after the newest record.
//!
//! Reads are zero-copy: the ring file is mapped, a record's pages are
//! faulted in with one `MADV_POPULATE_READ` (which reports I/O errors instead
//! of raising SIGBUS), verified in place, and handed out as a
//! [`MappedRecord`] that keeps the record pinned until dropped. The pages
//! are unmapped again on drop, so they count against the page cache, not
//! the process. Without that madvise (Linux < 5.14) reads fall back to
//! `pread` into the heap. One risk remains: if memory pressure evicts a
//! populated page before it is read and reading it back from disk then
//! fails, the access raises SIGBUS (a disk error on the cache device).

use crate::block::BlockBytes;
use restfs_proto::Hash;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: u64 = 0x5245_5354_4653_4332; // "RESTFSC2"
const HEADER: u64 = 64;
const ALIGN: u64 = 4096;

/// Smallest ring accepted.
pub const MIN_CAPACITY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache file: {0}")]
    Io(#[from] std::io::Error),
    #[error("block of {0} bytes does not fit a cache of {1} bytes")]
    TooLarge(u64, u64),
    #[error("cache is full of pinned blocks")]
    Full,
}

/// Counters, for `restfs stats` and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingStats {
    pub hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub blocks: u64,
    /// Blocks that cannot be evicted now (staged, or being read).
    pub pinned: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
    seq: u64,
    referenced: bool,
    /// Readers in progress plus explicit pins.
    pins: u32,
    /// Written completely (a reader may use it).
    ready: bool,
}

impl Entry {
    fn span(&self) -> u64 {
        record_span(self.len as u64)
    }
}

fn record_span(len: u64) -> u64 {
    (HEADER + len).div_ceil(ALIGN) * ALIGN
}

struct Index {
    by_hash: HashMap<Hash, Entry>,
    by_offset: BTreeMap<u64, Hash>,
    head: u64,
    seq: u64,
    bytes: u64,
}

pub struct BlockRing {
    file: File,
    /// The whole file, mapped read-only; `None` if it could not be mapped.
    map: Option<Mapping>,
    /// `MADV_POPULATE_READ` works here (cleared on the first EINVAL).
    populate: AtomicBool,
    capacity: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
}

/// A record header: magic, seq, SHA-256 address, length, XXH3-64 of the
/// block, and the low 32 bits of the XXH3-64 of all that.
fn header_bytes(seq: u64, hash: &Hash, data: &[u8]) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..48].copy_from_slice(&hash.0);
    h[48..52].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[52..60].copy_from_slice(&xxh3_64(data).to_le_bytes());
    let sum = xxh3_64(&h[0..60]) as u32;
    h[60..64].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A record header's (seq, address, length, block checksum), if intact.
fn parse_header(h: &[u8; HEADER as usize]) -> Option<(u64, Hash, u32, u64)> {
    if u64::from_le_bytes(h[0..8].try_into().ok()?) != MAGIC || (xxh3_64(&h[0..60]) as u32).to_le_bytes() != h[60..64] {
        return None;
    }
    let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let hash = Hash(h[16..48].try_into().ok()?);
    let len = u32::from_le_bytes(h[48..52].try_into().ok()?);
    let sum = u64::from_le_bytes(h[52..60].try_into().ok()?);
    Some((seq, hash, len, sum))
}

/// Read `len` bytes at `offset` into a new buffer, without zeroing it first
/// (a block is up to 8 MiB; zeroing cost as much as the read).
fn read_fresh(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let mut done = 0;
    while done < len {
        // SAFETY: pread writes at most `len - done` bytes into the spare
        // capacity past `done`, all of which the allocation holds.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().add(done).cast(), len - done, (offset + done as u64) as libc::off_t) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    // SAFETY: the first `len` bytes were written by pread above.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// Write `head` then `body` at `offset` with as few `pwritev` calls as the
/// kernel allows (no copy into one buffer first).
fn write_all_vectored_at(file: &File, head: &[u8], body: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let total = head.len() + body.len();
    let mut done = 0;
    while done < total {
        let parts: [&[u8]; 2] = if done < head.len() { [&head[done..], body] } else { [&[], &body[done - head.len()..]] };
        let iov = parts.map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
        // SAFETY: both iovecs point into live slices of the stated lengths.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), 2, (offset + done as u64) as libc::off_t) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
}

impl BlockRing {
    /// Open or create the ring at `path` with `capacity` bytes (rounded down
    /// to 4 KiB). A ring of another size is started afresh.
    pub fn open(path: &Path, capacity: u64) -> Result<BlockRing, CacheError> {
        let capacity = capacity.max(MIN_CAPACITY) / ALIGN * ALIGN;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if file.metadata()?.len() != capacity {
            file.set_len(0)?;
            file.set_len(capacity)?;
        }
        let map = Mapping::new(&file, capacity).map_err(|e| tracing::warn!("block cache is read with pread: cannot map it: {e}")).ok();
        let ring = BlockRing {
            file,
            map,
            populate: AtomicBool::new(true),
            capacity,
            index: Mutex::new(Index { by_hash: HashMap::new(), by_offset: BTreeMap::new(), head: 0, seq: 0, bytes: 0 }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        };
        ring.rebuild()?;
        Ok(ring)
    }

    /// Walk the headers and index every record that looks whole.
    fn rebuild(&self) -> Result<(), CacheError> {
        let mut ix = self.lock();
        let mut offset = 0;
        let mut newest: Option<(u64, u64)> = None; // (seq, end)
        let mut header = [0u8; HEADER as usize];
        while offset + HEADER <= self.capacity {
            self.file.read_exact_at(&mut header, offset)?;
            match parse_header(&header) {
                Some((seq, hash, len, _)) if offset + record_span(len as u64) <= self.capacity => {
                    let entry = Entry { offset, len, seq, referenced: false, pins: 0, ready: true };
                    let keep = ix.by_hash.get(&hash).is_none_or(|e| e.seq < seq);
                    if keep {
                        if let Some(old) = ix.by_hash.insert(hash, entry) {
                            ix.by_offset.remove(&old.offset);
                            ix.bytes -= old.len as u64;
                        }
                        ix.by_offset.insert(offset, hash);
                        ix.bytes += len as u64;
                    }
                    if newest.is_none_or(|(s, _)| seq > s) {
                        newest = Some((seq, offset + entry.span()));
                    }
                    offset += entry.span();
                }
                _ => match self.next_data(offset + ALIGN) {
                    Some(next) => offset = next.div_ceil(ALIGN) * ALIGN,
                    None => break,
                },
            }
        }
        // Records overlapping a newer one were partly overwritten: drop them.
        let mut last_end = 0;
        let offsets: Vec<u64> = ix.by_offset.keys().copied().collect();
        for off in offsets {
            let hash = ix.by_offset[&off];
            let e = ix.by_hash[&hash];
            if off < last_end {
                ix.by_offset.remove(&off);
                ix.by_hash.remove(&hash);
                ix.bytes -= e.len as u64;
                continue;
            }
            last_end = off + e.span();
        }
        if let Some((seq, end)) = newest {
            ix.seq = seq;
            ix.head = if end >= self.capacity { 0 } else { end };
        }
        Ok(())
    }

    /// The next offset at or after `from` that is not a hole (a fresh ring
    /// is sparse, so the walk skips it at once); `None` past the last data.
    fn next_data(&self, from: u64) -> Option<u64> {
        use std::os::fd::AsRawFd;
        if from >= self.capacity {
            return None;
        }
        // SAFETY: lseek on our own open descriptor.
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
        match at {
            -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => None,
            -1 => Some(from), // SEEK_DATA unsupported: walk every block
            at => Some(at as u64),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// A block's bytes, verified; `None` if absent or found corrupt.
    pub fn get(self: &Arc<Self>, hash: &Hash) -> Option<BlockBytes> {
        let (offset, len) = {
            let mut ix = self.lock();
            match ix.by_hash.get_mut(hash) {
                Some(e) if e.ready => {
                    e.referenced = true;
                    e.pins += 1;
                    (e.offset, e.len)
                }
                _ => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        };
        // The pin keeps the record from being overwritten while it is read.
        // A mapped read hands it on to the MappedRecord (dropping that
        // unpins); a pread copy needs it no more once read.
        let mut header = [0u8; HEADER as usize];
        let candidate = match self.map.as_ref().filter(|m| self.populate.load(Ordering::Relaxed) && self.fault_in(m, offset, len)) {
            Some(m) => {
                header.copy_from_slice(m.bytes(offset, HEADER as usize));
                Some(BlockBytes::Mapped(MappedRecord { ring: self.clone(), hash: *hash, offset, len: len as usize }))
            }
            None => {
                let read = self.file.read_exact_at(&mut header, offset).and_then(|_| read_fresh(&self.file, len as usize, offset + HEADER));
                self.unpin(hash);
                read.ok().map(BlockBytes::Heap)
            }
        };
        let whole = candidate
            .as_ref()
            .is_some_and(|data| parse_header(&header).is_some_and(|(_, h, l, sum)| h == *hash && l == len && xxh3_64(data) == sum));
        if whole {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return candidate;
        }
        drop(candidate);
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut ix = self.lock();
        if ix.by_hash.get(hash).is_some_and(|e| e.offset == offset && e.pins == 0) {
            Self::forget(&mut ix, hash);
        }
        None
    }

    /// Fault a record's pages in; false if it must be read with pread
    /// instead (an I/O error shows up there as a corrupt record).
    fn fault_in(&self, m: &Mapping, offset: u64, len: u32) -> bool {
        match m.populate(offset, record_span(len as u64)) {
            Ok(()) => true,
            Err(e) => {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    tracing::debug!("MADV_POPULATE_READ unsupported, block cache reads use pread");
                    self.populate.store(false, Ordering::Relaxed);
                }
                false
            }
        }
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.lock().by_hash.get(hash).is_some_and(|e| e.ready)
    }

    fn forget(ix: &mut Index, hash: &Hash) {
        if let Some(e) = ix.by_hash.remove(hash) {
            ix.by_offset.remove(&e.offset);
            ix.bytes -= e.len as u64;
        }
    }

    /// Store a block (a no-op if present). `pinned` keeps it from eviction
    /// until [`BlockRing::unpin`].
    pub fn insert(&self, hash: &Hash, data: &[u8], pinned: bool) -> Result<(), CacheError> {
        let span = record_span(data.len() as u64);
        if span > self.capacity {
            return Err(CacheError::TooLarge(data.len() as u64, self.capacity));
        }
        let (offset, seq) = {
            let mut ix = self.lock();
            if let Some(e) = ix.by_hash.get_mut(hash) {
                e.referenced = true;
                if pinned {
                    e.pins += 1;
                }
                return Ok(());
            }
            let offset = self.make_room(&mut ix, span)?;
            ix.seq += 1;
            let seq = ix.seq;
            let entry = Entry { offset, len: data.len() as u32, seq, referenced: false, pins: 1 + pinned as u32, ready: false };
            ix.by_hash.insert(*hash, entry);
            ix.by_offset.insert(offset, *hash);
            ix.bytes += data.len() as u64;
            ix.head = if offset + span >= self.capacity { 0 } else { offset + span };
            (offset, seq)
        };
        let written = write_all_vectored_at(&self.file, &header_bytes(seq, hash, data), data, offset);
        let mut ix = self.lock();
        match written {
            Ok(()) => {
                if let Some(e) = ix.by_hash.get_mut(hash) {
                    e.pins -= 1;
                    e.ready = true;
                }
                self.inserts.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                Self::forget(&mut ix, hash);
                Err(e.into())
            }
        }
    }

    /// Release one pin taken by `insert(.., true)`.
    pub fn unpin(&self, hash: &Hash) {
        if let Some(e) = self.lock().by_hash.get_mut(hash) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Free `span` contiguous bytes at the head, sweeping as CLOCK does.
    fn make_room(&self, ix: &mut Index, span: u64) -> Result<u64, CacheError> {
        let mut swept = 0u64;
        loop {
            if ix.head + span > self.capacity {
                // The tail is too short for this record: wrap (what lies there stays).
                swept += self.capacity - ix.head;
                ix.head = 0;
            }
            let (start, end) = (ix.head, ix.head + span);
            // The first record that overlaps [start, end), if any.
            let before = ix.by_offset.range(..start).next_back().map(|(o, h)| (*o, *h));
            let overlapping = match before {
                Some((o, h)) if o + ix.by_hash[&h].span() > start => Some((o, h)),
                _ => ix.by_offset.range(start..end).next().map(|(o, h)| (*o, *h)),
            };
            let Some((off, hash)) = overlapping else { return Ok(start) };
            let e = ix.by_hash[&hash];
            if swept > 2 * self.capacity {
                return Err(CacheError::Full);
            }
            if e.pins > 0 || e.referenced {
                // Second chance: keep it, clear its mark, move the head past it.
                if let Some(e) = ix.by_hash.get_mut(&hash) {
                    e.referenced = false;
                }
                let next = off + e.span();
                swept += next.saturating_sub(ix.head).max(ALIGN);
                ix.head = if next >= self.capacity { 0 } else { next };
            } else {
                Self::forget(ix, &hash);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> RingStats {
        let ix = self.lock();
        RingStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: ix.bytes,
            blocks: ix.by_hash.len() as u64,
            pinned: ix.by_hash.values().filter(|e| e.pins > 0).count() as u64,
        }
    }
}

/// A verified block read in place from the mapped ring. Its record stays
/// pinned until this is dropped.
pub struct MappedRecord {
    ring: Arc<BlockRing>,
    hash: Hash,
    offset: u64,
    len: usize,
}

impl MappedRecord {
    pub fn bytes(&self) -> &[u8] {
        match &self.ring.map {
            Some(m) => m.bytes(self.offset + HEADER, self.len),
            None => &[],
        }
    }
}

impl Drop for MappedRecord {
    fn drop(&mut self) {
        if let Some(m) = &self.ring.map {
            m.release(self.offset, record_span(self.len as u64));
        }
        self.ring.unpin(&self.hash);
    }
}

/// The ring file mapped shared and read-only.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read-only and only read at pinned records, which
// nothing writes while they are pinned.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: a fresh shared read-only mapping of our own file; the kernel picks the address.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }

    /// The mapped bytes at `offset`. Callers hold a pin on the record there.
    fn bytes(&self, offset: u64, len: usize) -> &[u8] {
        let offset = offset as usize;
        assert!(offset + len <= self.len, "read past the ring");
        // SAFETY: in bounds (checked above), mapped for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    fn advise(&self, offset: u64, len: u64, advice: libc::c_int) -> std::io::Result<()> {
        let (offset, len) = (offset as usize, (len as usize).min(self.len - offset as usize));
        // SAFETY: a page-aligned range inside the mapping.
        if unsafe { libc::madvise(self.ptr.add(offset).cast(), len, advice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read the pages of a range in (one call, I/O errors reported).
    fn populate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.advise(offset, len, libc::MADV_POPULATE_READ)
    }

    /// Unmap the pages of a range from this process (they stay in the page cache).
    fn release(&self, offset: u64, len: u64) {
        let _ = self.advise(offset, len, libc::MADV_DONTNEED);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped; no MappedRecord outlives the ring.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_ring(dir: &tempfile::TempDir) -> Arc<BlockRing> {
        Arc::new(BlockRing::open(&dir.path().join("ring"), MIN_CAPACITY).unwrap())
    }

    /// Insert `n` blocks of 1 MiB, seeds `first..first + n`.
    fn fill(ring: &BlockRing, first: u32, n: u32) {
        for i in first..first + n {
            let (h, d) = block(i, 1 << 20);
            ring.insert(&h, &d, false).unwrap();
        }
    }

    fn block(i: u32, len: usize) -> (Hash, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8).collect();
        (Hash::of(&data), data)
    }

    #[test]
    fn round_trip_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let blocks: Vec<_> = (0..20).map(|i| block(i, 100_000 + i as usize)).collect();
        {
            let ring = Arc::new(BlockRing::open(&path, MIN_CAPACITY).unwrap());
            for (h, d) in &blocks {
                ring.insert(h, d, false).unwrap();
            }
            for (h, d) in &blocks {
                assert_eq!(ring.get(h).as_deref(), Some(&d[..]));
            }
        }
        let ring = Arc::new(BlockRing::open(&path, MIN_CAPACITY).unwrap());
        assert_eq!(ring.stats().blocks, 20);
        for (h, d) in &blocks {
            assert_eq!(ring.get(h).as_deref(), Some(&d[..]), "warm after reopen");
        }
    }

    #[test]
    fn capacity_is_enforced_and_clock_keeps_hot_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let ring = fresh_ring(&dir);
        let hot = block(9999, 1 << 20);
        ring.insert(&hot.0, &hot.1, false).unwrap();
        for i in 0..200 {
            let (h, d) = block(i, 1 << 20);
            ring.insert(&h, &d, false).unwrap();
            assert!(ring.get(&hot.0).is_some(), "hot block evicted at {i}");
            assert!(ring.stats().bytes <= ring.capacity());
        }
        assert_eq!(std::fs::metadata(dir.path().join("ring")).unwrap().len(), MIN_CAPACITY);
        assert!(ring.stats().evictions > 150);
    }

    #[test]
    fn corruption_is_detected_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let ring = Arc::new(BlockRing::open(&path, MIN_CAPACITY).unwrap());
        let (h, d) = block(1, 50_000);
        ring.insert(&h, &d, false).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[d[1000] ^ 0xff], HEADER + 1000).unwrap();
        assert!(ring.get(&h).is_none());
        assert_eq!(ring.stats().corrupt, 1);
        assert!(!ring.contains(&h));
        ring.insert(&h, &d, false).unwrap();
        assert_eq!(ring.get(&h).as_deref(), Some(&d[..]));
    }

    #[test]
    fn pinned_blocks_survive_pressure_until_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let ring = fresh_ring(&dir);
        let dirty = block(7, 1 << 20);
        ring.insert(&dirty.0, &dirty.1, true).unwrap();
        fill(&ring, 100, 100);
        assert!(ring.contains(&dirty.0));
        ring.unpin(&dirty.0);
        fill(&ring, 300, 100);
        assert!(!ring.contains(&dirty.0));
    }

    #[test]
    fn blocks_read_in_place_stay_intact_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ring = fresh_ring(&dir);
        let kept = block(5, 1 << 20);
        ring.insert(&kept.0, &kept.1, false).unwrap();
        let held = ring.get(&kept.0).unwrap();
        assert!(matches!(held, BlockBytes::Mapped(_)), "reads are zero-copy on this kernel");
        fill(&ring, 500, 100);
        assert_eq!(*held, kept.1[..], "a record in use is never overwritten");
        drop(held);
        fill(&ring, 700, 100);
        assert!(!ring.contains(&kept.0), "released once dropped");
    }

    #[test]
    fn torn_records_read_as_misses_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let (h, d) = block(3, 200_000);
        {
            let ring = Arc::new(BlockRing::open(&path, MIN_CAPACITY).unwrap());
            ring.insert(&h, &d, false).unwrap();
        }
        // Simulate a crash mid-write: the tail of the record never reached the disk.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![0u8; 100_000], HEADER + 100_000).unwrap();
        let ring = Arc::new(BlockRing::open(&path, MIN_CAPACITY).unwrap());
        assert!(ring.get(&h).is_none());
        assert_eq!(ring.stats().corrupt, 1);
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(BlockRing::open(&dir.path().join("ring"), 32 << 20).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let (h, d) = block(t * 1000 + i % 50, 64 << 10);
                        ring.insert(&h, &d, false).unwrap();
                        if let Some(got) = ring.get(&h) {
                            assert_eq!(*got, d[..]);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ring.stats().corrupt, 0);
    }
}
