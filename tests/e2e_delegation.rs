//! Write-behind under the delegation: a mount alone on its bucket answers
//! creates, renames, removals and closes itself and sends them in ordered
//! batches. Another mount arriving recalls the delegation and sees every
//! change; changes a killed daemon had not sent reach the server at its
//! next mount; fsync still waits for the server.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn delegated(mnt: &Path) -> bool {
    restfs::stats::read(mnt).map(|s| s.delegated).unwrap_or(false)
}

fn wait_delegated(mnt: &Path, want: bool) {
    wait_until(&format!("{}: delegation held = {want}", mnt.display()), Duration::from_secs(10), || delegated(mnt) == want);
}

/// Distinct content per file.
fn content(i: usize) -> Vec<u8> {
    format!("file {i} ").repeat(i % 50 + 1).into_bytes()
}

const PER_CHANGE: &[&str] = &["fs.create", "fs.mkdir", "fs.rename", "fs.unlink", "fs.rmdir", "fs.link", "seg.commit"];

#[test]
fn a_lone_mount_answers_changes_itself_and_a_newcomer_sees_them_all() {
    let root = scratch("e2e-delegation");
    let server = Server::start(&root.join("data"));
    server.create_bucket("d");
    let (pa, pb) = (root.join("a"), root.join("b"));
    let a = Mount::new(&server, "d", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    wait_delegated(&pa, true);
    let count = |m: &str| server.counter_or_zero(&format!("requests.{m}"));
    let before: Vec<u64> = PER_CHANGE.iter().map(|m| count(m)).collect();
    let batches = count("fs.batch");

    let dir = pa.join("dir");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..300 {
        std::fs::write(dir.join(format!("f{i}")), content(i)).unwrap();
    }
    for i in (0..300).step_by(2) {
        std::fs::rename(dir.join(format!("f{i}")), dir.join(format!("g{i}"))).unwrap();
    }
    for i in (0..300).step_by(4) {
        std::fs::remove_file(dir.join(format!("g{i}"))).unwrap();
    }
    for i in (1..300).step_by(6) {
        std::fs::hard_link(dir.join(format!("f{i}")), dir.join(format!("h{i}"))).unwrap();
    }
    std::fs::create_dir(pa.join("gone")).unwrap();
    std::fs::remove_dir(pa.join("gone")).unwrap();
    let mut expected: Vec<(String, Vec<u8>)> =
        (0..300).filter(|i| i % 4 != 0).map(|i| (if i % 2 == 0 { format!("g{i}") } else { format!("f{i}") }, content(i))).collect();
    expected.extend((1..300).step_by(6).map(|i| (format!("h{i}"), content(i))));

    let after: Vec<u64> = PER_CHANGE.iter().map(|m| count(m)).collect();
    assert_eq!(before, after, "changes under the delegation went to the server one by one ({PER_CHANGE:?})");
    let stats = restfs::stats::read(&pa).unwrap();
    assert!(stats.counters["changes_delegated"] >= 300 + 300 + 150 + 75 + 50 + 3, "{:?}", stats.counters);
    let sent = count("fs.batch") - batches;
    assert!(sent < 300, "{sent} batches for 880 changes");

    // A second mount recalls the delegation and finds every change.
    let b = Mount::new(&server, "d", &pb, &format!("cache_dir={}", root.join("cache-b").display()));
    assert!(!delegated(&pa), "the delegation outlived the second mount's arrival");
    let mut names: Vec<String> =
        std::fs::read_dir(pb.join("dir")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, data) in &expected {
        assert_eq!(&std::fs::read(pb.join("dir").join(name)).unwrap(), data, "{name}");
    }
    use std::os::unix::fs::MetadataExt;
    for i in (1..300).step_by(6) {
        let (f, h) = (std::fs::metadata(pb.join(format!("dir/f{i}"))).unwrap(), std::fs::metadata(pb.join(format!("dir/h{i}"))).unwrap());
        assert_eq!((f.ino(), f.nlink()), (h.ino(), 2), "f{i} and h{i} should be one inode with two links");
    }
    assert!(!pb.join("gone").exists());

    // Two mounts: changes go to the server as they are made, both ways.
    std::fs::write(pb.join("from-b"), b"b").unwrap();
    assert_eq!(std::fs::read(pa.join("from-b")).unwrap(), b"b");
    std::fs::rename(pa.join("dir/f1"), pa.join("moved-by-a")).unwrap();
    assert_eq!(std::fs::read(pb.join("moved-by-a")).unwrap(), content(1));
    assert!(!pb.join("dir/f1").exists());

    // Alone again, the first mount gets the delegation back.
    b.unmount();
    wait_delegated(&pa, true);
    std::fs::write(pa.join("late"), b"late").unwrap();
    a.unmount();
    let a = Mount::new(&server, "d", &pb, &format!("cache_dir={}", root.join("cache-b").display()));
    assert_eq!(std::fs::read(pb.join("late")).unwrap(), b"late");
    a.unmount();
}

#[test]
fn changes_a_killed_daemon_had_not_sent_reach_the_server_at_its_next_mount() {
    let root = scratch("e2e-delegation-kill");
    let mut server = Server::start(&root.join("data"));
    server.create_bucket("d");
    let (pa, pb) = (root.join("a"), root.join("b"));
    let opts_a = format!("cache_dir={}", root.join("cache-a").display());
    let a = Mount::new(&server, "d", &pa, &opts_a);
    wait_delegated(&pa, true);
    std::fs::create_dir(pa.join("dir")).unwrap();
    // With the server frozen nothing is acknowledged: the changes stay queued.
    server.signal(libc::SIGSTOP);
    for i in 0..50 {
        std::fs::write(pa.join(format!("dir/f{i}")), content(i)).unwrap();
    }
    std::fs::rename(pa.join("dir/f0"), pa.join("dir/renamed")).unwrap();
    let queued = restfs::stats::read(&pa).unwrap().changes_queued;
    a.kill();
    server.signal(libc::SIGCONT);
    assert!(queued >= 50, "only {queued} changes were queued");

    // The next mount with the same cache sends them before anything else.
    let a = Mount::new(&server, "d", &pa, &opts_a);
    a.unmount();
    let b = Mount::new(&server, "d", &pb, &format!("cache_dir={}", root.join("cache-b").display()));
    assert_eq!(std::fs::read(pb.join("dir/renamed")).unwrap(), content(0));
    for i in 1..50 {
        assert_eq!(std::fs::read(pb.join(format!("dir/f{i}"))).unwrap(), content(i), "f{i}");
    }
    b.unmount();
    server.stop();
}

#[test]
fn fsync_returns_once_the_server_has_the_changes() {
    let (server, root, pa, a) = one_mount("e2e-delegation-fsync", "");
    wait_delegated(&pa, true);
    for i in 0..20 {
        std::fs::write(pa.join(format!("f{i}")), content(i)).unwrap();
    }
    let mut f = std::fs::File::create(pa.join("synced")).unwrap();
    f.write_all(b"on the server").unwrap();
    f.sync_all().unwrap();
    // Killed right after: a mount with another cache (no replay) finds it all.
    a.kill();
    let (pb, b) = second_mount(&server, &root);
    assert_eq!(std::fs::read(pb.join("synced")).unwrap(), b"on the server");
    for i in 0..20 {
        assert_eq!(std::fs::read(pb.join(format!("f{i}"))).unwrap(), content(i), "f{i}");
    }
    b.unmount();
    // The killed daemon's mount is dead: detach it.
    restfs::mount::lazy_unmount(&pa).unwrap();
}

#[test]
fn the_server_forgets_batch_outcomes_the_holder_has_logged() {
    let root = scratch("e2e-delegation-forget");
    let mut server = Server::start(&root.join("data"));
    server.create_bucket("d");
    let pa = root.join("a");
    let a = Mount::new(&server, "d", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    wait_delegated(&pa, true);
    let batches = server.counter_or_zero("requests.fs.batch");
    std::fs::write(pa.join("first"), b"1").unwrap();
    wait_until("the first batch", Duration::from_secs(10), || server.counter_or_zero("requests.fs.batch") > batches);
    assert_eq!(server.counter_or_zero("batch_outcomes_forgotten"), 0, "forgotten before the log was synced");
    // Past the holder's sync interval, its next batch names the earlier ones.
    std::thread::sleep(Duration::from_millis(5500));
    std::fs::write(pa.join("second"), b"2").unwrap();
    wait_until("outcomes forgotten", Duration::from_secs(10), || server.counter_or_zero("batch_outcomes_forgotten") >= 1);
    a.unmount();
    server.stop();
}

/// chmod, chown and utimes (what `tar` does to every file it extracts, on
/// the open file and by name) are answered by the lone mount itself; a
/// mount arriving later sees each of them, set-user-ID and all.
#[test]
fn mode_owner_and_time_changes_are_answered_locally_and_reach_a_newcomer() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = scratch("e2e-delegation-setattr");
    let server = Server::start(&root.join("data"));
    server.create_bucket("d");
    let (pa, pb) = (root.join("a"), root.join("b"));
    let a = Mount::new(&server, "d", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    wait_delegated(&pa, true);
    let setattrs = || server.counter_or_zero("requests.fs.setattr");
    let before = setattrs();

    let when = |i: i64| std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000 + i as u64 * 3600);
    for i in 0..100i64 {
        let path = pa.join(format!("f{i}"));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&content(i as usize)).unwrap();
        // As tar does: on the open file, written and not yet closed.
        f.set_modified(when(i)).unwrap();
        std::os::unix::fs::fchown(&f, Some(1000 + i as u32), Some(2000)).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o600 + i as u32 % 8)).unwrap();
        drop(f);
        if i % 10 == 0 {
            // And by name, closed.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755)).unwrap();
        }
    }
    assert_eq!(setattrs(), before, "setattr went to the server under the delegation");
    assert!(delegated(&pa));

    let b = Mount::new(&server, "d", &pb, &format!("cache_dir={}", root.join("cache-b").display()));
    for i in 0..100i64 {
        let m = std::fs::metadata(pb.join(format!("f{i}"))).unwrap();
        let mode = if i % 10 == 0 { 0o4755 } else { 0o600 + i as u32 % 8 };
        assert_eq!(m.mode() & 0o7777, mode, "f{i}: mode");
        assert_eq!((m.uid(), m.gid()), (1000 + i as u32, 2000), "f{i}: owner");
        assert_eq!(m.modified().unwrap(), when(i), "f{i}: mtime");
        assert_eq!(std::fs::read(pb.join(format!("f{i}"))).unwrap(), content(i as usize), "f{i}: content");
    }
    b.unmount();
    a.unmount();
}

/// SQLite's WAL index, among others: a file written, unlinked while open,
/// then closed. Its last commit is queued behind other changes; the release
/// that lets the server purge the orphan must not overtake it, or the server
/// refuses the commit and the next fsync reports that refusal.
#[test]
fn a_file_unlinked_while_open_commits_before_its_release() {
    let (_server, _root, pa, a) = one_mount("e2e-delegation-orphan", "");
    wait_delegated(&pa, true);
    std::fs::create_dir(pa.join("busy")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Keeps the delegation's queue busy.
    let busy = {
        let (dir, stop) = (pa.join("busy"), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(dir.join(format!("f{i}")), content(i)).unwrap();
                i += 1;
            }
        })
    };
    for i in 0..200 {
        let path = pa.join(format!("orphan{i}"));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&content(i)).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(b"written after the unlink").unwrap();
        drop(f);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    let f = std::fs::File::create(pa.join("last")).unwrap();
    f.sync_all().expect("a change made under the delegation was refused by the server");
    drop(f);
    assert!(delegated(&pa), "the delegation was lost on the way");
    a.unmount();
}

/// Through the writeback cache the kernel flushes a file's times as it
/// evicts the file, right after its last name goes: under the delegation
/// that is answered at once, not after the queue reaches the server.
#[test]
fn removing_files_through_the_writeback_cache_waits_for_nothing() {
    let (server, root, pa, a) = one_mount("e2e-delegation-wb-unlink", ",writeback");
    wait_delegated(&pa, true);
    for i in 0..200 {
        std::fs::write(pa.join(format!("f{i}")), content(i)).unwrap();
    }
    for i in 0..200 {
        std::fs::rename(pa.join(format!("f{i}")), pa.join(format!("g{i}"))).unwrap();
    }
    let setattrs = || restfs::stats::read(&pa).unwrap().ops.get("setattr").map_or((0, 0), |o| (o.count, o.waited));
    let setattrs_sent = server.counter_or_zero("requests.fs.setattr");
    let (count, waited) = setattrs();
    for i in 0..200 {
        std::fs::remove_file(pa.join(format!("g{i}"))).unwrap();
    }
    std::fs::write(pa.join("kept"), b"kept").unwrap();
    let (count_after, waited_after) = setattrs();
    assert!(count_after > count, "the kernel flushed no times at eviction: the test no longer tests anything");
    assert_eq!(waited_after, waited, "{} setattrs at eviction, {} waited", count_after - count, waited_after - waited);
    assert_eq!(server.counter_or_zero("requests.fs.setattr"), setattrs_sent, "setattrs went to the server");
    // A newcomer finds only what is left.
    let (pb, b) = second_mount(&server, &root);
    let names: Vec<String> = std::fs::read_dir(&pb).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["kept".to_string()]);
    b.unmount();
    a.unmount();
}

/// The cache directory's disk is full, so the delegation log cannot take
/// changes: their answers wait for the server instead, and so a daemon
/// killed right after loses none; the log is never left torn. Local
/// answers come back once there is room.
#[test]
fn a_full_cache_disk_makes_answers_wait_for_the_server_until_there_is_room() {
    let root = scratch("e2e-delegation-full-cache");
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "restfs-test-cache"]).arg(&cache));
    /// Unmounts the small disk even when the test fails.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _small_disk = Unmount(&cache);
    let server = Server::start(&root.join("data"));
    server.create_bucket("shared");
    let pa = root.join("a");
    let options = format!("cache_dir={},cache_size=2M", cache.display());
    let a = Mount::new(&server, "shared", &pa, &options);
    wait_delegated(&pa, true);
    let mut filler = std::fs::File::create(cache.join("filler")).unwrap();
    for i in 0..200 {
        // Takes the space the log frees whenever its queue drains.
        while filler.write_all(&[7; 4096]).is_ok() {}
        std::fs::write(pa.join(format!("f{i}")), content(i)).unwrap();
    }
    assert!(a.log().contains("cannot log a change in the delegation log"), "the log never failed: the test tests nothing");
    a.kill();
    drop(filler);
    std::fs::remove_file(cache.join("filler")).unwrap();
    let a = Mount::new(&server, "shared", &pa, &options);
    wait_delegated(&pa, true);
    let delegated_changes = || restfs::stats::read(&pa).unwrap().counters["changes_delegated"];
    let local_before = delegated_changes();
    for i in 200..400 {
        std::fs::write(pa.join(format!("f{i}")), content(i)).unwrap();
    }
    assert!(delegated_changes() - local_before >= 400, "local answers did not come back");
    let (pb, b) = second_mount(&server, &root);
    for i in 0..400 {
        assert_eq!(std::fs::read(pb.join(format!("f{i}"))).unwrap(), content(i), "f{i}");
    }
    b.unmount();
    a.unmount();
}
