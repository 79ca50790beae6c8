//! The `writeback` mount option: the kernel buffers writes in its page
//! cache. Random writes, truncates, appends and mmap stores through such a
//! mount must reach every other mount byte for byte once the file is closed,
//! with the size and mtime the writer saw.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn writes_buffered_by_the_kernel_reach_other_mounts_on_close() {
    let (_server, mnt_a, mnt_b, a, b) = two_mounts("e2e-writeback", ",writeback");

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut model: Vec<u8> = Vec::new();
    for round in 0..40 {
        // Each round opens the file (O_APPEND every fourth time), applies a
        // few random changes to it and to the model, and closes it.
        let append = round % 4 == 3;
        let mut f = std::fs::OpenOptions::new().read(true).write(!append).append(append).create(true).open(mnt_a.join("f")).unwrap();
        for _ in 0..1 + rng.below(6) {
            let byte = rng.below(256) as u8;
            if append {
                let len = 1 + rng.below(70_000) as usize;
                f.write_all(&vec![byte; len]).unwrap();
                model.extend(std::iter::repeat_n(byte, len));
                continue;
            }
            match rng.below(10) {
                0 => {
                    let size = rng.below(3 << 20);
                    f.set_len(size).unwrap();
                    model.resize(size as usize, 0);
                }
                _ => {
                    // Partial pages, page-straddling and block-straddling writes.
                    let at = rng.below(3 << 20);
                    let longest = if rng.below(4) == 0 { 1 << 20 } else { 9000 };
                    let len = 1 + rng.below(longest) as usize;
                    f.write_all_at(&vec![byte; len], at).unwrap();
                    let end = at as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[at as usize..end].fill(byte);
                }
            }
        }
        // What the writer sees before closing.
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "round {round}: size seen by the writer");
        let mtime = f.metadata().unwrap().mtime_nsec();
        drop(f);
        let got = std::fs::read(mnt_b.join("f")).unwrap();
        assert_eq!(got.len(), model.len(), "round {round}: size seen by the other mount");
        assert!(got == model, "round {round}: content seen by the other mount differs");
        let other = std::fs::metadata(mnt_b.join("f")).unwrap();
        assert_eq!(other.mtime_nsec(), mtime, "round {round}: mtime seen by the other mount");
    }

    // Stores through a shared mapping reach the other mount after msync and close.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(mnt_a.join("f")).unwrap();
    let len = model.len().max(1);
    f.set_len(len as u64).unwrap();
    model.resize(len, 0);
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
        for i in (0..len).step_by(4093) {
            bytes[i] = 0xA5;
            model[i] = 0xA5;
        }
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "msync");
        assert_eq!(libc::munmap(p, len), 0, "munmap");
    }
    drop(f);
    assert!(std::fs::read(mnt_b.join("f")).unwrap() == model, "mmap stores seen by the other mount");

    // Data fsync'd through the writeback cache survives the writer's death.
    let mut g = std::fs::File::create(mnt_a.join("g")).unwrap();
    g.write_all(b"durable").unwrap();
    g.sync_all().unwrap();
    a.kill();
    assert_eq!(std::fs::read(mnt_b.join("g")).unwrap(), b"durable");
    b.unmount();
    // The killed daemon's mount is dead: detach it.
    restfs::mount::lazy_unmount(&mnt_a).unwrap();
}
