//! Telling a sequential writer from a random one by the ranges it writes.
//!
//! A sequential writer's blocks are sent as soon as they fill; a random
//! writer's small writes wait as patches (see [`super::patch`]) and its
//! blocks go once, with the commit. The kernel blurs the picture both ways:
//! - it sends a writer's pages from several threads, a little out of order;
//! - it cuts one unaligned write into pieces at pages its cache does not
//!   hold whole, and those pieces continue each other.
//!
//! So what marks a random writer is a write that lands *far* from the
//! recent ones: it neither begins where one ended or ends where one began,
//! nor begins a little past where one ended (a little: as many of its own
//! lengths as writes are remembered). A file is random while at least two
//! of its last writes landed far; a sequential writer never does, a random
//! one with its writes cut in two still does every other time.

use std::collections::VecDeque;

/// Writes remembered.
const RECENT_WRITES: usize = 8;
/// Far writes among the recent ones that make a file random.
const FAR_TO_RANDOM: u32 = 2;

/// The order a file is written in, as seen so far.
#[derive(Debug)]
pub struct WriteOrder {
    /// Ranges of the last writes, newest last.
    recent: VecDeque<(u64, u64)>,
    /// Which of the last writes landed far, newest in the lowest bit.
    far: u8,
}

impl Default for WriteOrder {
    /// A file opened is taken to be written from its start, in order.
    fn default() -> Self {
        WriteOrder { recent: VecDeque::from([(0, 0)]), far: 0 }
    }
}

impl WriteOrder {
    /// Note a write of `offset..end`.
    pub fn note(&mut self, offset: u64, end: u64) {
        let reach = (end - offset).saturating_mul(RECENT_WRITES as u64);
        let near = self.recent.iter().any(|&(from, to)| end == from || (to..=to.saturating_add(reach)).contains(&offset));
        self.far = (self.far << 1) | u8::from(!near);
        if self.recent.len() == RECENT_WRITES {
            self.recent.pop_front();
        }
        self.recent.push_back((offset, end));
    }

    /// Writes go in order: fewer than two of the last ones landed far.
    pub fn sequential(&self) -> bool {
        self.far.count_ones() < FAR_TO_RANDOM
    }

    /// Where the last write ended.
    pub fn last_end(&self) -> u64 {
        self.recent.back().map_or(0, |&(_, end)| end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn random_offsets(n: usize) -> Vec<u64> {
        let mut x: u64 = 7;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (x >> 24) % (64 * BLOCK)
            })
            .collect()
    }

    #[test]
    fn a_sequential_writer_stays_sequential_even_a_little_out_of_order() {
        let mut order = WriteOrder::default();
        // Pages sent in pairs, the second of each pair first.
        for pair in 0..1000u64 {
            for page in [2 * pair + 1, 2 * pair] {
                order.note(page * PAGE, (page + 1) * PAGE);
                assert!(order.sequential(), "page {page}");
            }
        }
    }

    #[test]
    fn two_writes_that_continue_nothing_make_a_file_random() {
        let mut order = WriteOrder::default();
        order.note(5 * BLOCK + 17, 5 * BLOCK + 900);
        assert!(order.sequential(), "one jump is not enough");
        order.note(2 * BLOCK + 3, 2 * BLOCK + 60);
        assert!(!order.sequential());
    }

    #[test]
    fn random_writes_cut_at_page_boundaries_stay_random() {
        let mut order = WriteOrder::default();
        for (i, offset) in random_offsets(5000).into_iter().enumerate() {
            // An 8000-byte write sent as the kernel does for pages it lacks:
            // up to the first page boundary, then the rest.
            let cut = (offset / PAGE + 1) * PAGE;
            order.note(offset, cut);
            order.note(cut, offset + 8000);
            assert!(i < 1 || !order.sequential(), "write {i} at {offset} taken for a stream");
        }
    }

    #[test]
    fn a_random_file_turns_sequential_after_a_few_writes_in_order() {
        let mut order = WriteOrder::default();
        for offset in random_offsets(10) {
            order.note(offset, offset + 100);
        }
        assert!(!order.sequential());
        let start = 100 * BLOCK;
        for i in 0..RECENT_WRITES as u64 {
            assert!(!order.sequential(), "sequential after {i} writes in order");
            order.note(start + i * PAGE, start + (i + 1) * PAGE);
        }
        assert!(order.sequential());
    }
}
