//! Two mounts of one bucket, each with its own cache directory:
//! close-to-open consistency. After close() returns on A, an open() on B
//! sees exactly what A wrote, even when B read an older version before,
//! and even though B answers opens from its caches (callbacks): A's close
//! returns only once B has applied the change, or B's lease ran out.

mod common;

use common::*;
use std::io::Write;

#[test]
fn close_on_one_mount_then_open_on_the_other_sees_the_data() {
    let (_server, pa, pb, a, b) = two_mounts("e2e-two", "");

    // Sizes that grow, shrink and cross block boundaries.
    let sizes = [10usize, 5000, 3, 1 << 20, (1 << 20) + 7, 2_500_000, 0, 77];
    for (round, size) in sizes.iter().enumerate() {
        let content: Vec<u8> = (0..*size).map(|i| (i * 31 + round * 7) as u8).collect();
        {
            let mut f = std::fs::File::create(pa.join("f")).unwrap();
            f.write_all(&content).unwrap();
        } // close() on A
        let seen = std::fs::read(pb.join("f")).unwrap(); // open() + read on B
        assert_eq!(seen.len(), content.len(), "round {round}: size seen on B");
        assert!(seen == content, "round {round}: content seen on B");
    }

    // Directory changes made on A are visible to opens on B.
    std::fs::write(pa.join("new"), b"fresh").unwrap();
    assert_eq!(std::fs::read(pb.join("new")).unwrap(), b"fresh");
    std::fs::create_dir(pa.join("dir")).unwrap();
    std::fs::rename(pa.join("new"), pa.join("dir/moved")).unwrap();
    assert_eq!(std::fs::read(pb.join("dir/moved")).unwrap(), b"fresh");
    std::fs::remove_file(pa.join("dir/moved")).unwrap();
    assert_eq!(std::fs::File::open(pb.join("dir/moved")).unwrap_err().kind(), std::io::ErrorKind::NotFound);

    // And the other way round.
    std::fs::write(pb.join("from-b"), b"hello from b").unwrap();
    assert_eq!(std::fs::read(pa.join("from-b")).unwrap(), b"hello from b");

    a.unmount();
    b.unmount();
}

/// Poll `check` for up to two seconds; returns how long it took.
/// A change made on one mount shows on the other within 2 s.
fn eventually(what: &str, check: impl FnMut() -> bool) -> std::time::Duration {
    wait_until(what, std::time::Duration::from_secs(2), check)
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn pushes_reach_warm_caches_on_the_other_mount() {
    use std::os::unix::fs::FileExt;
    let (_server, pa, pb, a, b) = two_mounts("e2e-push", "");

    // An fd held open on B sees A's rewrite (same size) through B's page cache.
    std::fs::write(pa.join("f"), vec![b'0'; 8192]).unwrap();
    eventually("first version on B", || std::fs::read(pb.join("f")).is_ok_and(|d| d == vec![b'0'; 8192]));
    let held = std::fs::File::open(pb.join("f")).unwrap();
    let mut buf = vec![0u8; 8192];
    for round in 1..=20u8 {
        let want = vec![b'a' + round; 8192];
        // Rewrite in place (no truncation), then close.
        std::fs::OpenOptions::new().write(true).open(pa.join("f")).unwrap().write_all_at(&want, 0).unwrap();
        eventually("rewrite through a held fd", || held.read_exact_at(&mut buf, 0).is_ok() && buf == want);
    }

    // Directory changes on A show in a listing on B.
    let before = names(&pb);
    std::fs::write(pa.join("created"), b"x").unwrap();
    eventually("create in ls", || names(&pb).contains(&"created".to_string()));
    std::fs::rename(pa.join("created"), pa.join("renamed")).unwrap();
    eventually("rename in ls", || {
        let n = names(&pb);
        n.contains(&"renamed".to_string()) && !n.contains(&"created".to_string())
    });
    std::fs::remove_file(pa.join("renamed")).unwrap();
    eventually("unlink in ls", || names(&pb) == before);
    // And a stat on B sees A's chmod.
    std::fs::set_permissions(pa.join("f"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    eventually("chmod in stat", || {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pb.join("f")).unwrap().permissions()) & 0o777 == 0o600
    });

    drop(held);
    a.unmount();
    b.unmount();
}

#[test]
fn absent_names_are_cached_by_the_kernel_until_created_elsewhere() {
    let (_server, pa, pb, a, b) = two_mounts("e2e-absent", "");
    std::fs::create_dir(pa.join("dir")).unwrap();
    eventually("dir on B", || pb.join("dir").is_dir());
    let lookups = || restfs::stats::read(&pb).unwrap().ops.get("lookup").map_or(0, |o| o.count);

    for path in [pb.join("late"), pb.join("dir/late")] {
        assert!(std::fs::metadata(&path).is_err());
        let before = lookups();
        for _ in 0..100 {
            assert_eq!(std::fs::metadata(&path).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        }
        let asked = lookups() - before;
        assert!(asked < 5, "{}: 100 stats of an absent name cost {asked} lookups", path.display());
    }
    // Created on A: B's kernel drops its negative entries at the push.
    std::fs::write(pa.join("late"), b"top").unwrap();
    std::fs::write(pa.join("dir/late"), b"nested").unwrap();
    eventually("create seen on B", || std::fs::read(pb.join("late")).is_ok_and(|d| d == b"top"));
    eventually("nested create seen on B", || std::fs::read(pb.join("dir/late")).is_ok_and(|d| d == b"nested"));
    // And removed again: absent on B once more.
    std::fs::remove_file(pa.join("late")).unwrap();
    eventually("unlink seen on B", || !pb.join("late").exists());
    a.unmount();
    b.unmount();
}

/// Same-size rewrites are the hard case for caches answering opens: the
/// size, the kernel's pages and the cached attributes all look current.
#[test]
fn opens_from_cache_see_every_rewrite_closed_elsewhere() {
    let (_server, pa, pb, a, b) = two_mounts("e2e-callbacks", "");
    for round in 0..300u32 {
        let content = vec![(round % 251) as u8; 4096];
        std::fs::write(pa.join("f"), &content).unwrap();
        assert!(std::fs::read(pb.join("f")).unwrap() == content, "round {round}: B read an old version");
        // And back: B writes, A reads.
        let back = vec![(round % 241) as u8 ^ 0x55; 4096];
        std::fs::write(pb.join("g"), &back).unwrap();
        assert!(std::fs::read(pa.join("g")).unwrap() == back, "round {round}: A read an old version");
    }
    a.unmount();
    b.unmount();
}

/// A frozen client cannot hold up the others for longer than its lease
/// (3 s), and once thawed it reconnects, catches up and sees the change.
#[test]
fn a_frozen_mount_delays_changes_elsewhere_by_at_most_its_lease() {
    let (_server, pa, pb, a, b) = two_mounts("e2e-frozen", "");
    std::fs::write(pa.join("f"), b"before").unwrap();
    assert_eq!(std::fs::read(pb.join("f")).unwrap(), b"before");

    b.signal(libc::SIGSTOP);
    let start = std::time::Instant::now();
    std::fs::write(pa.join("f"), b"after!").unwrap();
    let waited = start.elapsed();
    b.signal(libc::SIGCONT);
    assert!(waited < std::time::Duration::from_secs(8), "close on A waited {waited:?} for a frozen B");

    let seen = eventually("the change on the thawed mount", || std::fs::read(pb.join("f")).is_ok_and(|d| d == b"after!"));
    eprintln!("close on A waited {waited:?}; B saw the change {seen:?} after thawing");
    a.unmount();
    b.unmount();
}

/// Opens answered from the cache are unknown to the server until the file
/// loses its last name: then they are registered (with the acknowledgement
/// on another mount, before the unlink on the same one), so the file lives
/// on until closed.
#[test]
fn files_held_open_survive_their_unlinking() {
    use std::io::Read;
    let (_server, pa, pb, a, b) = two_mounts("e2e-held", "");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    for name in ["elsewhere", "here"] {
        std::fs::write(pa.join(name), &content).unwrap();
    }

    // Known by attributes only (no data cached), so the open is local and
    // every byte must still come from the server after the unlinking.
    std::fs::metadata(pb.join("elsewhere")).unwrap();
    let mut held = std::fs::File::open(pb.join("elsewhere")).unwrap();
    std::fs::remove_file(pa.join("elsewhere")).unwrap();
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == content, "the file held open on B lost its content when A unlinked it");
    drop(held);

    std::fs::metadata(pa.join("here")).unwrap();
    let mut held = std::fs::File::open(pa.join("here")).unwrap();
    std::fs::remove_file(pa.join("here")).unwrap();
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == content, "the file held open on A lost its content when A unlinked it");
    drop(held);
    a.unmount();
    b.unmount();
}

/// Sequential reads on one mount prefetch blocks ahead; an overwrite, a
/// truncate and an extension closed on the other mount must never let a
/// prefetched (or kernel-cached) block of the old content through, neither
/// to a descriptor held across the changes nor to a new open.
#[test]
fn prefetched_data_is_never_stale_after_changes_elsewhere() {
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1 << 20;
    let (_server, pa, pb, a, b) = two_mounts("e2e-prefetch", "");
    let pattern = |v: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i / 4096) as u8 ^ v).collect() };
    let read_at = |f: &std::fs::File, off: usize, len: usize| -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read_at(&mut buf[got..], (off + got) as u64).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        buf
    };

    std::fs::write(pa.join("f"), pattern(1, 24 * MIB)).unwrap();
    let held = std::fs::File::open(pb.join("f")).unwrap();
    // Sequential reads of the first third: prefetch runs ahead.
    for off in (0..8 * MIB).step_by(MIB) {
        assert!(read_at(&held, off, MIB) == pattern(1, 24 * MIB)[off..off + MIB]);
    }

    // Overwrite in place, same size.
    std::fs::OpenOptions::new().write(true).open(pa.join("f")).unwrap().write_all_at(&pattern(2, 24 * MIB), 0).unwrap();
    let v2 = pattern(2, 24 * MIB);
    assert!(read_at(&held, 8 * MIB, 16 * MIB) == v2[8 * MIB..], "held fd: stale data after an overwrite");
    assert!(std::fs::read(pb.join("f")).unwrap() == v2, "new open: stale data after an overwrite");

    // Truncate, then extend again: the cut range must read as zeros.
    std::fs::OpenOptions::new().write(true).open(pa.join("f")).unwrap().set_len(12 * MIB as u64).unwrap();
    assert_eq!(read_at(&held, 16 * MIB, MIB).len(), 0, "held fd: data past the truncated end");
    assert!(read_at(&held, 8 * MIB, 4 * MIB) == v2[8 * MIB..12 * MIB]);
    std::fs::OpenOptions::new().write(true).open(pa.join("f")).unwrap().set_len(24 * MIB as u64).unwrap();
    let mut want = v2[..12 * MIB].to_vec();
    want.resize(24 * MIB, 0);
    assert!(read_at(&held, 0, 24 * MIB) == want, "held fd: old blocks came back after truncate and extend");
    assert!(std::fs::read(pb.join("f")).unwrap() == want, "new open: old blocks came back after truncate and extend");
    drop(held);
    a.unmount();
    b.unmount();
}

/// fallocate's PUNCH_HOLE and ZERO_RANGE: the ranges read as zeros on both
/// mounts, on the block boundaries and off them; only ZERO_RANGE without
/// KEEP_SIZE moves the size. Modes beyond those are refused.
#[test]
fn punched_and_zeroed_ranges_read_as_zeros_on_both_mounts() {
    use std::os::fd::AsRawFd;
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-punch", "");
    let block = 1usize << 20;
    let len = 3 * block + 12_345;
    let mut want = pattern_at(3, 0, len);
    std::fs::write(pa.join("f"), &want).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(pa.join("f")).unwrap();
    let fallocate = |mode: i32, from: usize, n: usize| {
        // SAFETY: a valid descriptor; fallocate reads no memory of ours.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, from as i64, n as i64) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    };
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    // Half of block 0, all of block 1 (a hole), half of block 2.
    fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, block / 2, 2 * block).unwrap();
    want[block / 2..block / 2 + 2 * block].fill(0);
    // Within one block, and past the end with KEEP_SIZE (the size stays).
    fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, 100, 50).unwrap();
    want[100..150].fill(0);
    fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, len - 10, 1000).unwrap();
    want[len - 10..].fill(0);
    // ZERO_RANGE over the end without KEEP_SIZE grows the file.
    fallocate(libc::FALLOC_FL_ZERO_RANGE, 3 * block - 5, 2 * block).unwrap();
    want.truncate(3 * block - 5);
    want.resize(5 * block - 5, 0);
    let err = fallocate(libc::FALLOC_FL_COLLAPSE_RANGE, 0, block).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
    assert!(std::fs::read(pa.join("f")).unwrap() == want, "content on A while open");
    drop(f);
    for p in [&pa, &pb] {
        let seen = std::fs::read(p.join("f")).unwrap();
        assert_eq!(seen.len(), want.len(), "size on {}", p.display());
        assert!(seen == want, "content on {}", p.display());
    }

    // A hole through a 1 TiB sparse file (a million blocks) with data in
    // two places: only what is there is removed (a slot per block spanned
    // would not fit in one message).
    let tib = 1u64 << 40;
    let big = std::fs::File::create(pa.join("sparse")).unwrap();
    big.set_len(tib).unwrap();
    use std::os::unix::fs::FileExt;
    big.write_all_at(b"early", 5 << 30).unwrap();
    big.write_all_at(b"late", tib - 4).unwrap();
    drop(big);
    let big = std::fs::OpenOptions::new().write(true).open(pa.join("sparse")).unwrap();
    // SAFETY: a valid descriptor; fallocate reads no memory of ours.
    let r = unsafe { libc::fallocate(big.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | keep, 0, (tib - 2) as i64) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    drop(big);
    let big = std::fs::File::open(pb.join("sparse")).unwrap();
    assert_eq!(big.metadata().unwrap().len(), tib);
    let mut buf = [9u8; 5];
    big.read_exact_at(&mut buf, 5 << 30).unwrap();
    assert_eq!(&buf, &[0; 5]);
    let mut tail = [9u8; 4];
    big.read_exact_at(&mut tail, tib - 4).unwrap();
    assert_eq!(&tail, b"\0\0te");
}

/// B keeps a directory's listing in the kernel (a second listing sends no
/// request), yet every create, removal and rename on A shows in B's next
/// listing as soon as A's call returns.
#[test]
fn listings_cached_on_one_mount_follow_changes_made_on_the_other() {
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-listings", "");
    std::fs::create_dir(pa.join("d")).unwrap();
    let (da, db) = (pa.join("d"), pb.join("d"));
    let listing = |d: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    };
    let requests = || {
        let ops = restfs::stats::read(&pb).unwrap().ops;
        ["readdir", "readdirplus"].iter().map(|op| ops.get(*op).map_or(0, |s| s.count)).sum::<u64>()
    };
    for i in 0..5 {
        std::fs::write(da.join(format!("f{i}")), b"x").unwrap();
    }
    listing(&db);
    // Settled: the last request of that listing may be counted just after its reply.
    let mut before = requests();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = requests();
        if now == before {
            break;
        }
        before = now;
    }
    assert_eq!(listing(&db).len(), 5);
    assert_eq!(requests(), before, "a second listing is answered by the kernel");
    for round in 0..150 {
        match round % 3 {
            0 => std::fs::write(da.join(format!("n{round}")), b"x").unwrap(),
            1 => std::fs::remove_file(da.join(&listing(&da)[0])).unwrap(),
            _ => std::fs::rename(da.join(listing(&da).last().unwrap()), da.join(format!("r{round}"))).unwrap(),
        }
        assert_eq!(listing(&db), listing(&da), "round {round}: B's listing is stale");
    }
}
