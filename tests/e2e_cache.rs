//! The on-disk caches under real mounts: a remount starts warm (the server
//! serves no block, and a read completes with the server paused), a corrupted cached block is refetched and
//! counted, the cache stays within its size during a much larger copy, and
//! a `kill -9` of the client leaves a cache the next mount opens, with all
//! fsync'd data intact.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A server with bucket `bucket`, under a fresh scratch dir: (server,
/// mountpoint, cache dir, mount options with a cache of `cache_size`).
fn cached_setup(name: &str, bucket: &str, cache_size: &str) -> (Server, std::path::PathBuf, std::path::PathBuf, String) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket(bucket);
    let cache = root.join("cache");
    let opts = format!("cache_dir={},cache_size={cache_size}", cache.display());
    (server, root.join("mnt"), cache, opts)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
}

#[test]
fn remount_is_warm_the_server_serves_no_block() {
    let (server, mnt, _, opts) = cached_setup("e2e-warm", "w", "1G");
    let data = pattern(256 << 20, 1);
    let m = Mount::new(&server, "w", &mnt, &opts);
    std::fs::write(mnt.join("big"), &data).unwrap();
    m.unmount();

    let m = Mount::new(&server, "w", &mnt, &opts);
    let before = server.counter("block_gets");
    // With the server paused, a warm read needs no round trip at all.
    server.signal(libc::SIGSTOP);
    let path = mnt.join("big");
    let reader = std::thread::spawn(move || std::fs::read(path).map(|got| got == data));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let finished_while_paused = reader.is_finished();
    server.signal(libc::SIGCONT);
    assert!(finished_while_paused, "the warm read did not complete while the server was paused");
    assert!(reader.join().unwrap().unwrap(), "content after remount");
    assert_eq!(server.counter("block_gets"), before, "a warm read must fetch no block from the server");
    m.unmount();
}

#[test]
fn corrupt_cached_block_is_refetched_and_counted() {
    let (server, mnt, cache, opts) = cached_setup("e2e-corrupt", "c", "64M");
    let data = pattern(3 << 20, 2);
    let m = Mount::new(&server, "c", &mnt, &opts);
    std::fs::write(mnt.join("f"), &data).unwrap();
    m.unmount();

    // Flip one byte inside the first cached record's data (records start at offset 0).
    let ring = std::fs::OpenOptions::new().read(true).write(true).open(cache.join("blocks.ring")).unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&ring, &mut byte, 64 + 4321).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&ring, &[byte[0] ^ 0x5a], 64 + 4321).unwrap();
    drop(ring);

    let m = Mount::new(&server, "c", &mnt, &opts);
    let before = server.counter("block_gets");
    assert!(std::fs::read(mnt.join("f")).unwrap() == data, "reads stay correct over a corrupt cache");
    assert!(server.counter("block_gets") > before, "the corrupt block is fetched again");
    let log_before_unmount = m.path.with_extension("mount.log");
    m.unmount();
    let log = std::fs::read_to_string(log_before_unmount).unwrap();
    assert!(log.contains("corrupt=1"), "the corruption counter rises:\n{log}");
}

/// Bytes the cache directory occupies on disk.
fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)).sum()
}

#[test]
fn cache_stays_within_its_size_during_a_larger_copy() {
    const SIZE: u64 = 32 << 20;
    const SLACK: u64 = 1 << 20; // the lock file and filesystem rounding
    let (server, mnt, cache, opts) = cached_setup("e2e-capacity", "cap", &SIZE.to_string());
    let m = Mount::new(&server, "cap", &mnt, &opts);
    let mut peak = 0;
    for i in 0..16u32 {
        let mut f = std::fs::File::create(mnt.join(format!("f{i}"))).unwrap();
        for chunk in 0..8u32 {
            f.write_all(&pattern(1 << 20, i * 100 + chunk)).unwrap();
            peak = peak.max(disk_usage(&cache));
        }
    }
    assert!(peak <= SIZE + SLACK, "cache used {peak} bytes for a {SIZE}-byte limit");
    for i in 0..16u32 {
        let got = std::fs::read(mnt.join(format!("f{i}"))).unwrap();
        let want: Vec<u8> = (0..8u32).flat_map(|c| pattern(1 << 20, i * 100 + c)).collect();
        assert!(got == want, "f{i} after the copy");
        peak = peak.max(disk_usage(&cache));
    }
    assert!(peak <= SIZE + SLACK, "cache used {peak} bytes for a {SIZE}-byte limit");
    m.unmount();
}

#[test]
fn client_killed_mid_write_remounts_with_fsynced_data_intact() {
    let (server, mnt, _, opts) = cached_setup("e2e-crash", "k", "64M");
    let m = Mount::new(&server, "k", &mnt, &opts);

    let dir = mnt.clone();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = progress.clone();
    let writer = std::thread::spawn(move || {
        let mut synced = Vec::new();
        for i in 0..10_000u32 {
            let data = pattern(100_000 + (i as usize % 7) * 300_000, i);
            let written = std::fs::File::create(dir.join(format!("w{i}"))).and_then(|mut f| {
                f.write_all(&data)?;
                f.sync_all()
            });
            match written {
                Ok(()) => synced.push((i, data)),
                Err(_) => break, // the client died under us
            }
            done.store(synced.len(), std::sync::atomic::Ordering::Release);
        }
        synced
    });
    // Kill mid-workload, once some files are fsync'd (however slow the machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while progress.load(std::sync::atomic::Ordering::Acquire) < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    m.kill();
    let synced = writer.join().unwrap();
    assert!(synced.len() > 3, "the workload should have fsync'd files before the kill");

    let m = Mount::new(&server, "k", &mnt, &opts);
    for (i, data) in &synced {
        assert!(std::fs::read(mnt.join(format!("w{i}"))).unwrap() == *data, "fsync'd file w{i} after the crash");
    }
    m.unmount();
}

/// A close the server never acknowledged (it was stopped) leaves its blocks
/// pinned in the disk cache and the commit journaled: after a `kill -9` of
/// the client, the next mount completes it.
#[test]
fn unacknowledged_close_is_completed_by_the_next_mount() {
    let (server, mnt, _, opts) = cached_setup("e2e-unacked", "u", "64M");
    let m = Mount::new(&server, "u", &mnt, &opts);
    std::fs::write(mnt.join("f"), b"before").unwrap();
    std::fs::write(mnt.join("untouched"), b"same").unwrap();

    // Written while the server is up (only the close commits), then the
    // close waits for a server that no longer answers, and the client dies
    // under it.
    let data = pattern(3 << 20, 7);
    let mut f = std::fs::OpenOptions::new().write(true).open(mnt.join("f")).unwrap();
    f.write_all(&data).unwrap();
    server.signal(libc::SIGSTOP);
    let closer = std::thread::spawn(move || -> std::io::Result<()> {
        use std::os::fd::IntoRawFd;
        // SAFETY: closing the descriptor this thread owns, once.
        match unsafe { libc::close(f.into_raw_fd()) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!closer.is_finished(), "the close cannot complete while the server is stopped");
    m.kill();
    assert!(closer.join().unwrap().is_err(), "the application saw the close fail");
    server.signal(libc::SIGCONT);

    let m = Mount::new(&server, "u", &mnt, &opts);
    assert!(std::fs::read(mnt.join("f")).unwrap() == data, "the journaled commit was completed");
    assert_eq!(std::fs::read(mnt.join("untouched")).unwrap(), b"same");
    assert!(m.log().contains("completed the unacknowledged commit"), "{}", m.log());
    m.unmount();
}
