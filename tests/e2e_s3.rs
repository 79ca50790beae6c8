//! restfsd with its blocks in an S3-compatible store: s3s-fs, a real S3
//! server spoken to over HTTP with signed requests. Files written on one
//! mount read back on another whose cache is empty, so their blocks come
//! from S3 through restfsd; garbage collection deletes the objects; an
//! outage of the store delays writes without losing them; and a wrong
//! secret, a data directory whose blocks are elsewhere, or a second data
//! directory on the same prefix stops restfsd at start with a clear error.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

const BUCKET: &str = "restfs-blocks";
const PREFIX: &str = "cluster-1";

/// s3s-fs with the bucket, restfsd keeping its blocks there, and the bucket
/// `shared` mounted at `root/a` and `root/b`.
fn s3_mounts(name: &str) -> (S3Server, Server, PathBuf, PathBuf, PathBuf, Mount, Mount) {
    let root = scratch(name);
    let s3 = S3Server::start(&root.join("s3"));
    s3.create_bucket(BUCKET);
    let location = format!("s3://{BUCKET}/{PREFIX}");
    let server = Server::start_with_env(&root.join("data"), &["--blocks", &location], &s3.env());
    server.create_bucket("shared");
    let pa = root.join("a");
    let a = Mount::new(&server, "shared", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    let (pb, b) = second_mount(&server, &root);
    (s3, server, root, pa, pb, a, b)
}

/// `n` MiB whose blocks all differ (a pattern alone repeats every 256 bytes).
fn distinct_blocks(seed: u64, n: u64) -> Vec<u8> {
    (0..n).flat_map(|k| pattern_at(seed * 64 + k, k << 20, 1 << 20)).collect()
}

/// The block objects in the bucket (the prefix also holds the object naming
/// its data directory).
fn blocks_in(s3: &S3Server) -> Vec<String> {
    s3.objects(BUCKET, PREFIX).into_iter().filter(|o| o.len() == 64 && o.chars().all(|c| c.is_ascii_hexdigit())).collect()
}

/// Files in `dir` at any depth.
fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum()
}

#[test]
fn blocks_live_in_the_s3_bucket_and_read_back_on_another_mount() {
    let (s3, server, root, pa, pb, a, b) = s3_mounts("e2e-s3");
    let big = distinct_blocks(1, 8);
    std::fs::write(pa.join("big"), &big).unwrap();
    std::fs::create_dir(pa.join("tree")).unwrap();
    for i in 0..20 {
        std::fs::write(pa.join("tree").join(format!("f{i}")), pattern_at(i, 0, 100_000 + i as usize)).unwrap();
    }
    // 8 blocks of 1 MiB and 20 of 100 kB: every one an object, none on
    // restfsd's disk. (A sync waits for what the delegation has queued.)
    assert!(std::process::Command::new("sync").arg("-f").arg(&pa).status().unwrap().success());
    let objects = s3.objects(BUCKET, PREFIX);
    assert_eq!(blocks_in(&s3).len(), 28, "objects in the bucket: {objects:?}");
    assert_eq!(objects.len(), 29, "objects in the bucket besides the blocks and the owner: {objects:?}");
    assert_eq!(files_under(&root.join("data").join("blocks")), 0, "restfsd stored blocks on its own disk");

    assert!(std::fs::read(pb.join("big")).unwrap() == big, "b read other bytes");
    for i in 0..20 {
        assert_eq!(std::fs::read(pb.join("tree").join(format!("f{i}"))).unwrap(), pattern_at(i, 0, 100_000 + i as usize));
    }
    assert!(server.counter("block_gets") >= 28, "b's reads did not come from the server");

    // Unreferenced, the blocks go from the bucket at the next collection.
    std::fs::remove_file(pa.join("big")).unwrap();
    std::fs::remove_dir_all(pa.join("tree")).unwrap();
    wait_until("the collection empties the bucket", Duration::from_secs(20), || {
        let (code, out) = server.admin(&["gc", "--min-age", "0"]);
        assert_eq!(code, 0, "gc failed: {out}");
        blocks_in(&s3).is_empty()
    });
    a.unmount();
    b.unmount();

    // The metadata names blocks only the bucket holds: the data directory
    // cannot be served without it.
    let mut server = server;
    server.stop();
    let out = std::process::Command::new(RESTFSD).args(["--listen", "127.0.0.1:0", "--data"]).arg(&server.data).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restfsd served the data directory without its blocks: {stderr}");
    assert!(stderr.contains(&format!("start restfsd with --blocks s3://{BUCKET}/{PREFIX}")), "unclear error: {stderr}");
}

#[test]
fn an_outage_of_the_store_delays_writes_and_loses_none() {
    let (mut s3, _server, root, pa, pb, a, b) = s3_mounts("e2e-s3-outage");
    s3.stop();
    let data = distinct_blocks(2, 4);
    let source = root.join("source");
    std::fs::write(&source, &data).unwrap();
    // Another process: the test's own fds on the mount would hold up the
    // start of s3s-fs (its exec closes them, which sends FLUSH).
    let mut writer = std::process::Command::new("dd")
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", pa.join("during-outage").display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(writer.try_wait().unwrap().is_none(), "fsync returned while the block store was down");
    s3.resume();
    assert!(writer.wait().unwrap().success(), "the write failed over the outage");
    assert_eq!(blocks_in(&s3).len(), 4);
    assert!(std::fs::read(pb.join("during-outage")).unwrap() == data, "b read other bytes");
    a.unmount();
    b.unmount();
}

#[test]
fn a_wrong_secret_or_a_second_data_directory_stops_restfsd_at_start() {
    let root = scratch("e2e-s3-refused");
    let s3 = S3Server::start(&root.join("s3"));
    s3.create_bucket(BUCKET);
    let env = s3.env().into_iter().map(|(k, v)| if k == "AWS_SECRET_ACCESS_KEY" { (k, "not-the-secret".to_string()) } else { (k, v) });
    let out = std::process::Command::new(RESTFSD)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(root.join("data"))
        .args(["--blocks", &format!("s3://{BUCKET}")])
        .envs(env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restfsd started with a wrong secret: {stderr}");
    assert!(stderr.contains("access denied") && stderr.contains("AWS_SECRET_ACCESS_KEY"), "unclear error: {stderr}");

    // One prefix, one data directory: a second one's garbage collection
    // would delete the first one's blocks.
    // Started with the bucket's prefix: (its first telling line, whether it
    // then stopped cleanly on SIGTERM).
    let restfsd = |data: &str| {
        use std::io::BufRead;
        let mut child = std::process::Command::new(RESTFSD)
            .args(["--listen", "127.0.0.1:0", "--log", "info", "--data"])
            .arg(root.join(data))
            .args(["--blocks", &format!("s3://{BUCKET}/{PREFIX}")])
            .env_remove("RESTFS_LOG")
            .envs(s3.env())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read on a thread to the end: restfsd must never write to a closed pipe.
        let (lines, rx) = std::sync::mpsc::channel();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let reader = std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(|l| drop(lines.send(l))));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut first = String::new();
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            if line.contains("listening on") || line.contains("restfsd:") {
                first = line;
                break;
            }
        }
        // SAFETY: signalling our own child (not yet waited for).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        reader.join().unwrap();
        (first, status.success())
    };
    let (first, clean) = restfsd("data-1");
    assert!(first.contains("listening on") && clean, "the first data directory was refused (clean exit: {clean}): {first}");
    let (second, _) = restfsd("data-2");
    assert!(second.contains("another restfsd data directory"), "a second data directory was let in: {second}");
    let (again, clean) = restfsd("data-1");
    assert!(again.contains("listening on") && clean, "the first data directory was refused after a restart (clean exit: {clean}): {again}");
    // Refused, data-2 was bound to nothing: it can start on another prefix.
    assert!(!root.join("data-2").join("blocks.location").exists(), "a refused start bound its data directory");

    let out = std::process::Command::new(RESTFSD)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(root.join("data"))
        .args(["--blocks", "/srv/blocks"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("s3://"), "a non-S3 location was taken: {stderr}");
}
