//! Concurrent writers on a real mount: threads sharing one file, processes
//! writing their own. Each writes more than the in-memory dirty limit, so
//! uploads run in the background while writes go on; every byte is checked
//! through the mount, then again from a second mount with a cold cache.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::process::Command;

const WRITERS: u64 = 8;
/// Bytes per writer: past the dirty limit (8 blocks of 1 MiB), and ranges
/// straddle block boundaries.
const SHARE: u64 = (10 << 20) + 12_345;

/// Deterministic bytes that differ per position and per seed.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i).wrapping_mul(0x9E37_79B9) ^ seed.wrapping_mul(0x85EB_CA6B)) as u8).collect()
}

#[test]
fn eight_threads_write_disjoint_ranges_of_one_file_and_eight_processes_write_eight_files() {
    concurrent_writers("e2e-concurrency", "");
}

#[test]
fn the_same_through_the_kernels_writeback_cache() {
    concurrent_writers("e2e-concurrency-wb", ",writeback");
}

fn concurrent_writers(name: &str, options: &str) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket("conc");
    let mnt = root.join("mnt");
    let m = Mount::new(&server, "conc", &mnt, &format!("cache_dir={}{options}", root.join("cache-a").display()));

    // Threads: one file, disjoint interleaved ranges, written in odd-sized chunks.
    let shared = mnt.join("shared.bin");
    let file = std::fs::File::create(&shared).unwrap();
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let file = &file;
            s.spawn(move || {
                let start = t * SHARE;
                let mut at = 0;
                while at < SHARE {
                    let n = (100_003).min(SHARE - at);
                    file.write_all_at(&pattern(1, start + at, n as usize), start + at).unwrap();
                    at += n;
                }
            });
        }
    });
    file.sync_all().unwrap();
    drop(file);

    // Processes: each copies its own source file in with dd.
    let sources = root.join("sources");
    std::fs::create_dir_all(&sources).unwrap();
    let children: Vec<_> = (0..WRITERS)
        .map(|p| {
            let src = sources.join(format!("f{p}"));
            std::fs::write(&src, pattern(100 + p, 0, SHARE as usize)).unwrap();
            Command::new("dd")
                .arg(format!("if={}", src.display()))
                .arg(format!("of={}", mnt.join(format!("f{p}")).display()))
                .args(["bs=256k", "conv=fsync", "status=none"])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "dd failed");
    }

    let check = |dir: &std::path::Path, how: &str| {
        let got = std::fs::read(dir.join("shared.bin")).unwrap();
        assert_eq!(got.len() as u64, WRITERS * SHARE, "{how}: size of the shared file");
        for t in 0..WRITERS {
            let (a, b) = ((t * SHARE) as usize, ((t + 1) * SHARE) as usize);
            assert!(got[a..b] == pattern(1, a as u64, b - a)[..], "{how}: thread {t}'s range differs");
        }
        for p in 0..WRITERS {
            assert!(same_content(&sources.join(format!("f{p}")), &dir.join(format!("f{p}"))), "{how}: file f{p} differs");
        }
    };
    check(&mnt, "same mount");

    let mnt_b = root.join("mnt-b");
    let b = Mount::new(&server, "conc", &mnt_b, &format!("cache_dir={}", root.join("cache-b").display()));
    check(&mnt_b, "second mount, cold cache");
    b.unmount();
    m.unmount();
}

/// A writer jumping around a file bigger than the dirty limit: its writes
/// wait as patches, then as whole blocks in the disk cache, for the commit,
/// instead of each block being sent each time; every byte arrives, and
/// reads meanwhile see them.
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
    let mut model = pattern(1, 0, (BLOCKS << 20) as usize);
    std::fs::write(&path, &model).unwrap();
    let uploaded = || restfs::stats::read(&mnt).unwrap().counters["blocks_uploaded"];
    let before = uploaded();

    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut x: u64 = 12345;
    for i in 0..WRITES {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let offset = (x >> 24) % ((BLOCKS << 20) - 8192);
        let data = pattern(i + 2, offset, 1 + (x % 8000) as usize);
        f.write_all_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
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
