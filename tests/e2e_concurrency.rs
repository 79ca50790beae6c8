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
                    file.write_all_at(&pattern_at(1, start + at, n as usize), start + at).unwrap();
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
            std::fs::write(&src, pattern_at(100 + p, 0, SHARE as usize)).unwrap();
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
            assert!(got[a..b] == pattern_at(1, a as u64, b - a)[..], "{how}: thread {t}'s range differs");
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
