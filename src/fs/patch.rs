//! Writes into blocks not held whole in memory, kept as byte ranges until
//! the block is needed whole. A random writer then costs what it writes:
//! without them each small write read its whole block first, and the
//! block was hashed and staged again every time the writer came back.

use std::collections::BTreeMap;

/// The byte ranges written into some blocks: block index → (offset in
/// the block → bytes). Ranges of one block never overlap or touch.
#[derive(Default)]
pub struct Patches {
    blocks: BTreeMap<u64, BTreeMap<u32, Vec<u8>>>,
    bytes: usize,
}

impl Patches {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn contains(&self, idx: u64) -> bool {
        self.blocks.contains_key(&idx)
    }

    /// The blocks with writes in `range`.
    pub fn indexes(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = u64> + '_ {
        self.blocks.range(range).map(|(idx, _)| *idx)
    }

    /// What was written into block `idx`.
    pub fn get(&self, idx: u64) -> Option<&BTreeMap<u32, Vec<u8>>> {
        self.blocks.get(&idx)
    }

    /// The block with the most bytes written.
    pub fn fullest(&self) -> Option<u64> {
        self.blocks.iter().max_by_key(|(_, ranges)| ranges.values().map(Vec::len).sum::<usize>()).map(|(idx, _)| *idx)
    }

    /// Write `data` at `from` in block `idx`, over what was written there.
    pub fn add(&mut self, idx: u64, from: u32, data: &[u8]) {
        let ranges = self.blocks.entry(idx).or_default();
        let to = from + data.len() as u32;
        // The ranges `data` overlaps or touches merge with it into one.
        let touching: Vec<u32> =
            ranges.range(..=to).rev().take_while(|(start, bytes)| **start + bytes.len() as u32 >= from).map(|(s, _)| *s).collect();
        let Some(&first) = touching.last() else {
            self.bytes += data.len();
            ranges.insert(from, data.to_vec());
            return;
        };
        let start = first.min(from);
        let mut merged = ranges.remove(&first).expect("listed above");
        self.bytes -= merged.len();
        if first > from {
            let mut front = data.to_vec();
            front.extend_from_slice(&merged[(to - first).min(merged.len() as u32) as usize..]);
            merged = front;
        }
        for s in touching.iter().rev().skip(1) {
            let bytes = ranges.remove(s).expect("listed above");
            self.bytes -= bytes.len();
            let at = (s - start) as usize;
            if merged.len() < at + bytes.len() {
                merged.resize(at + bytes.len(), 0);
            }
            merged[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let at = (from - start) as usize;
        if merged.len() < at + data.len() {
            merged.resize(at + data.len(), 0);
        }
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len();
        ranges.insert(start, merged);
    }

    /// The bytes of block `idx` if it was written whole (from 0 to `len`).
    pub fn take_whole(&mut self, idx: u64, len: u32) -> Option<Vec<u8>> {
        let ranges = self.blocks.get(&idx)?;
        if ranges.len() != 1 || ranges.get(&0).is_none_or(|b| b.len() < len as usize) {
            return None;
        }
        self.take(idx).and_then(|mut r| r.remove(&0))
    }

    /// Drop what was written into block `idx`, and give it.
    pub fn take(&mut self, idx: u64) -> Option<BTreeMap<u32, Vec<u8>>> {
        let ranges = self.blocks.remove(&idx)?;
        self.bytes -= ranges.values().map(Vec::len).sum::<usize>();
        Some(ranges)
    }
}

/// Lay `ranges` over `block` (its valid bytes), extending it with zeros
/// where they reach past its end.
pub fn apply(block: &mut Vec<u8>, ranges: &BTreeMap<u32, Vec<u8>>) {
    for (start, bytes) in ranges {
        let (from, to) = (*start as usize, *start as usize + bytes.len());
        if block.len() < to {
            block.resize(to, 0);
        }
        block[from..to].copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any writes, laid over any block, read as the same writes made
        /// in place; the ranges stay disjoint and the byte count true.
        #[test]
        fn patches_match_writes_in_place(
            base_len in 0usize..300,
            writes in prop::collection::vec((0u32..280, prop::collection::vec(any::<u8>(), 1..40)), 1..30),
        ) {
            let base: Vec<u8> = (0..base_len).map(|i| i as u8 ^ 0x5a).collect();
            let mut model = base.clone();
            let mut patches = Patches::default();
            for (from, data) in &writes {
                patches.add(7, *from, data);
                let to = *from as usize + data.len();
                if model.len() < to {
                    model.resize(to, 0);
                }
                model[*from as usize..to].copy_from_slice(data);
            }
            let ranges = patches.blocks[&7].clone();
            let mut end = None;
            for (start, bytes) in &ranges {
                prop_assert!(end.is_none_or(|e| *start > e), "ranges overlap or touch: {ranges:?}");
                end = Some(start + bytes.len() as u32);
            }
            prop_assert_eq!(patches.bytes(), ranges.values().map(Vec::len).sum::<usize>());
            let mut block = base;
            apply(&mut block, &patches.take(7).unwrap());
            prop_assert_eq!(block, model);
            prop_assert_eq!(patches.bytes(), 0);
        }
    }

    #[test]
    fn a_block_written_whole_needs_no_base() {
        let mut p = Patches::default();
        p.add(3, 100, &[1; 100]);
        assert_eq!(p.take_whole(3, 200), None);
        p.add(3, 0, &[2; 100]);
        assert_eq!(p.take_whole(3, 300), None);
        let whole = p.take_whole(3, 200).unwrap();
        assert_eq!((whole.len(), whole[0], whole[150]), (200, 2, 1));
        assert!(!p.contains(3) && p.bytes() == 0);
    }
}
