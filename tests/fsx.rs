//! fsx (the File System eXerciser, crate 0.3.2) against real mounts. It
//! applies a seeded random sequence of operations to one file (writes,
//! reads, mmap reads and writes, truncates, fallocate, hole punching,
//! sendfile, copy_file_range, fsync, close and reopen) and checks every
//! read against its own model of the content. `scripts/test.sh` installs
//! it when missing. The seeds are fixed, so a failure replays exactly.

mod common;

use common::*;
use std::process::Command;

/// Operations per run: about ten seconds each here.
const OPS: &str = "4000";

fn fsx_binary() -> String {
    installed_tool("FSX", "fsx", "0.3.2")
}

/// Run fsx with `seed` on a fresh file in `dir`; artifacts (fsx's log and
/// the good and bad copies on a failure) go to `artifacts`.
fn fsx(dir: &std::path::Path, artifacts: &std::path::Path, seed: u64) {
    let config = artifacts.join("fsx.toml");
    std::fs::create_dir_all(artifacts).unwrap();
    std::fs::write(&config, include_str!("fsx/fsx.toml")).unwrap();
    let out = Command::new(fsx_binary())
        .args(["-f", &config.to_string_lossy(), "-N", OPS, "-S", &seed.to_string(), "-P", &artifacts.to_string_lossy()])
        .arg(dir.join(format!("fsx-{seed}")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("All operations completed A-OK!"), "fsx -S {seed} failed ({}):\n{text}", out.status);
}

#[test]
fn fsx_on_a_mount_holding_the_delegation() {
    let (_server, root, pa, a) = one_mount("fsx-delegated", "");
    fsx(&pa, &root.join("fsx"), 7);
    a.unmount();
}

#[test]
fn fsx_through_the_kernels_writeback_cache() {
    let (_server, root, pa, a) = one_mount("fsx-writeback", ",writeback");
    fsx(&pa, &root.join("fsx"), 11);
    a.unmount();
}

/// Every change straight to the server, in blocks of 4 KiB: each write,
/// truncate and punched hole crosses many block boundaries.
#[test]
fn fsx_on_small_blocks_without_the_delegation() {
    let root = scratch("fsx-small-blocks");
    let server = Server::start(&root.join("data"));
    let (code, out) = server.admin(&["bucket", "create", "--block-size", "4096", "small"]);
    assert_eq!(code, 0, "bucket create failed: {out}");
    let mnt = root.join("m");
    let m = Mount::new(&server, "small", &mnt, &format!("cache_dir={},nodelegate", root.join("cache").display()));
    fsx(&mnt, &root.join("fsx"), 5);
    m.unmount();
}
