//! End to end: a real restfsd, a real FUSE mount. A real source tree (plus
//! a large file, odd names and a symlink) is copied in with
//! `cp -a`, compared by content, mode and mtime, copied back out, and must
//! survive an unmount, a server restart and a remount.

mod common;

use common::*;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

/// The tree to copy: a crate's sources plus awkward cases.
fn build_fixture(dir: &std::path::Path) {
    run(Command::new("cp").arg("-a").arg(registry_crate_tree()).arg(dir.join("crate")));
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let big: Vec<u8> = (0..5_000_003u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(odd.join("big.bin"), &big).unwrap();
    std::fs::write(odd.join("empty"), b"").unwrap();
    std::fs::write(odd.join(std::ffi::OsStr::from_bytes(&[b'n', 0xff, 0xfe, b'!'])), b"non-UTF-8 name").unwrap();
    std::fs::write(odd.join("x".repeat(255)), b"longest name").unwrap();
    std::os::unix::fs::symlink("big.bin", odd.join("link")).unwrap();
    std::fs::set_permissions(odd.join("empty"), std::os::unix::fs::PermissionsExt::from_mode(0o4751)).unwrap();
}

#[test]
fn tree_copied_in_and_out_survives_remount_and_server_restart() {
    let root = scratch("e2e-tree");
    let fixture = root.join("fixture");
    std::fs::create_dir_all(&fixture).unwrap();
    build_fixture(&fixture);

    let mut server = Server::start(&root.join("data"));
    server.create_bucket("tree");
    let mnt = root.join("mnt");
    let options = format!("cache_dir={}", root.join("cache").display());

    let m = Mount::new(&server, "tree", &mnt, &options);
    write_sparse(&mnt.join("sparse"));
    run(Command::new("cp").arg("-a").arg(&fixture).arg(mnt.join("copy")));
    let entries = assert_same_tree(&fixture, &mnt.join("copy"));
    assert!(entries > 500, "only {entries} entries compared");
    let out = root.join("out");
    run(Command::new("cp").arg("-a").arg(mnt.join("copy")).arg(&out));
    assert_same_tree(&fixture, &out);
    m.unmount();

    let m = Mount::new(&server, "tree", &mnt, &options);
    assert_same_tree(&fixture, &mnt.join("copy"));
    m.unmount();

    server.restart();
    let m = Mount::new(&server, "tree", &mnt, &options);
    assert_same_tree(&fixture, &mnt.join("copy"));
    check_sparse(&mnt.join("sparse"));
    m.unmount();
}

const FAR: u64 = 5_000_000_000; // past 4 GiB

/// A 6 GiB file with data at offset 0 and past 4 GiB, holes elsewhere.
fn write_sparse(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"far data", FAR).unwrap();
    f.set_len(6 << 30).unwrap();
}

fn check_sparse(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 6 << 30);
    let at = |off: u64, len: usize| {
        let mut buf = vec![0xAAu8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    };
    assert_eq!(at(0, 8), b"head\0\0\0\0");
    assert_eq!(at(FAR - 4, 12), b"\0\0\0\0far data");
    assert!(at(3 << 30, 1 << 20).iter().all(|b| *b == 0), "hole must read as zeros");
    assert!(at((6 << 30) - 4096, 4096).iter().all(|b| *b == 0), "tail hole must read as zeros");
}
