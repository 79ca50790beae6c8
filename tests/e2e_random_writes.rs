//! A random writer on a real mount: its small writes wait as patches, its
//! full blocks wait in the disk cache, and each block is sent once per
//! commit. Alone in its binary: a test running beside it that starts a
//! process would, by closing its copy of the open descriptor at exec, make
//! the kernel flush (commit) the file mid-way.

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// A writer jumping around a file bigger than the dirty limit: its writes
/// wait as patches, then as whole blocks in the disk cache, for the commit,
/// instead of each block being sent each time; every byte arrives, and
/// reads meanwhile see them. The kernel's page cache is dropped now and
/// then: it then cuts each write in pieces at page boundaries, pieces that
/// continue each other and must not pass for a sequential writer.
#[test]
fn random_writes_send_each_block_once_per_commit() {
    const BLOCKS: u64 = 24;
    const WRITES: u64 = 12_000;
    let root = scratch("e2e-random-writes");
    let server = Server::start(&root.join("data"));
    server.create_bucket("rand");
    let mnt = root.join("mnt");
    let m = Mount::new(&server, "rand", &mnt, &format!("cache_dir={}", root.join("cache-a").display()));
    let path = mnt.join("random.bin");
    let mut model = pattern_at(1, 0, (BLOCKS << 20) as usize);
    std::fs::write(&path, &model).unwrap();
    let uploaded = || restfs::stats::read(&mnt).unwrap().counters["blocks_uploaded"];
    let before = uploaded();

    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut x: u64 = 12345;
    for i in 0..WRITES {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let offset = (x >> 24) % ((BLOCKS << 20) - 8192);
        let data = pattern_at(i + 2, offset, 1 + (x % 8000) as usize);
        f.write_all_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        if i % 1000 == 0 {
            // SAFETY: an open descriptor; advice only.
            assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        }
        if i % 500 == 499 {
            // A staged copy of each block at most, and one that reads hold.
            let pinned = restfs::stats::read(&mnt).unwrap().counters["blocks_pinned"];
            assert!(pinned <= 2 * BLOCKS, "{pinned} blocks pinned in the disk cache after {i} writes");
        }
        if i == WRITES / 2 {
            // Through the same descriptor (no commit): the pages written in
            // part are read from the daemon, which lays its patches over.
            let mut now = vec![0; model.len()];
            f.read_exact_at(&mut now, 0).unwrap();
            assert!(now == model, "content differs before the commit");
        }
    }
    drop(f);
    let sent = uploaded() - before;
    assert!(sent <= BLOCKS, "{sent} blocks sent for {WRITES} random writes to a {BLOCKS}-block file");
    assert!(std::fs::read(&path).unwrap() == model, "content differs through the writing mount");

    let mnt_b = root.join("mnt-b");
    let b = Mount::new(&server, "rand", &mnt_b, &format!("cache_dir={}", root.join("cache-b").display()));
    assert!(std::fs::read(mnt_b.join("random.bin")).unwrap() == model, "content differs from a second mount");
    b.unmount();
    m.unmount();
}
