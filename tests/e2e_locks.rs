//! Byte-range (`fcntl`) and `flock` locks across two mounts of one bucket:
//! they conflict as on one machine, go with a close or with a mount that
//! dies, a blocked waiter gets the lock once it is free (or gives up on a
//! signal), and whoever takes a lock reads what the last holder wrote.

mod common;

use common::*;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn open_rw(path: &std::path::Path) -> File {
    std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap()
}

/// `fcntl(cmd)` with a lock of `typ` over `len` bytes at `start` (0: to the end).
fn fcntl(f: &File, cmd: i32, typ: i32, start: i64, len: i64) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: a valid descriptor and a flock that lives through the call.
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) } == 0 { Ok(fl) } else { Err(std::io::Error::last_os_error()) }
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn refused(r: std::io::Result<impl std::fmt::Debug>) {
    let e = r.expect_err("the lock should be refused");
    assert!(matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)), "{e}");
}

#[test]
fn fcntl_locks_conflict_across_mounts_and_go_with_a_close() {
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-locks-fcntl", "");
    std::fs::write(pa.join("f"), b"0123456789").unwrap();
    let fa = open_rw(&pa.join("f"));
    let fb = open_rw(&pb.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 50, 10));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_RDLCK, 99, 1));
    let seen = fcntl(&fb, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!((seen.l_type as i32, seen.l_start, seen.l_len), (libc::F_WRLCK, 0, 100), "F_GETLK on B names A's lock");
    fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 100, 0).unwrap();
    // A downgrades to a read lock: B may read-lock, not write-lock.
    fcntl(&fa, libc::F_SETLK, libc::F_RDLCK, 0, 100).unwrap();
    fcntl(&fb, libc::F_SETLK, libc::F_RDLCK, 0, 10).unwrap();
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 20, 1));
    // Closing any descriptor of the file drops the process's locks.
    drop(fa);
    fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let fa = open_rw(&pa.join("f"));
    refused(fcntl(&fa, libc::F_SETLK, libc::F_RDLCK, 5, 1));
    fcntl(&fb, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    fcntl(&fa, libc::F_SETLK, libc::F_RDLCK, 5, 1).unwrap();
    // A read-only descriptor (closed without FLUSH) lets go too.
    drop(fa);
    let ra = File::open(pa.join("f")).unwrap();
    fcntl(&ra, libc::F_SETLK, libc::F_RDLCK, 0, 0).unwrap();
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    drop(ra);
    wait_until("the read lock goes with its descriptor", Duration::from_secs(5), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
}

#[test]
fn flock_excludes_across_mounts() {
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-locks-flock", "");
    std::fs::write(pa.join("lockfile"), b"").unwrap();
    let fa = File::open(pa.join("lockfile")).unwrap();
    let fb = File::open(pb.join("lockfile")).unwrap();
    flock(&fa, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    refused(flock(&fb, libc::LOCK_SH | libc::LOCK_NB));
    flock(&fa, libc::LOCK_SH).unwrap();
    flock(&fb, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    refused(flock(&fa, libc::LOCK_EX | libc::LOCK_NB));
    flock(&fb, libc::LOCK_UN).unwrap();
    flock(&fa, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    // The lock goes with the last close of its file.
    drop(fa);
    wait_until("the flock goes with its file", Duration::from_secs(5), || flock(&fb, libc::LOCK_EX | libc::LOCK_NB).is_ok());
}

/// A waiter blocked in F_SETLKW gets the lock once the holder lets go, and
/// reads what the holder wrote under it, though it had cached the file
/// before; a waiter sent a signal stops waiting.
#[test]
fn a_blocked_waiter_gets_the_lock_and_the_data_written_under_it() {
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-locks-wait", "");
    std::fs::write(pa.join("f"), b"old content").unwrap();
    let fb = open_rw(&pb.join("f"));
    let mut buf = vec![0; 11];
    fb.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"old content");
    let fa = open_rw(&pa.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let held = Duration::from_millis(300);
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        fcntl(&fb, libc::F_SETLKW, libc::F_WRLCK, 0, 0).unwrap();
        let waited = started.elapsed();
        let mut buf = vec![0; 11];
        fb.read_exact_at(&mut buf, 0).unwrap();
        (waited, buf)
    });
    std::thread::sleep(held);
    fa.write_all_at(b"new content", 0).unwrap();
    fcntl(&fa, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    let (waited, seen) = waiter.join().unwrap();
    assert!(waited >= held - Duration::from_millis(50), "F_SETLKW returned after {waited:?}, before the lock was free");
    assert_eq!(seen, b"new content", "the data written under the lock");

    // A process waiting for a lock held elsewhere dies of SIGTERM at once.
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let script = "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX)";
    let mut child = std::process::Command::new("python3").args(["-c", script]).arg(pb.join("f")).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the waiter did not wait");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let since = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(since.elapsed() < Duration::from_secs(5), "a waiter sent SIGTERM still waits");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_locks_of_a_mount_that_dies_go_with_it() {
    let (_server, pa, pb, a, _b) = two_mounts("e2e-locks-dead", "");
    std::fs::write(pa.join("f"), b"x").unwrap();
    let fa = open_rw(&pa.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let fb = open_rw(&pb.join("f"));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    std::mem::forget(fa);
    a.kill();
    wait_until("the dead mount's lock is gone", Duration::from_secs(10), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
    // The dead mount is left to the kernel (its descriptor is still open).
    let _ = std::process::Command::new("umount").arg("-l").arg(&pa).status();
}

/// A mount alone holds the delegation and answers locks itself (processes
/// on it still exclude each other); a newcomer's arrival hands them to the
/// server, where the newcomer meets them.
#[test]
fn locks_taken_under_the_delegation_reach_a_newcomer() {
    let (server, root, pa, a) = one_mount("e2e-locks-delegated", "");
    wait_until("the delegation", Duration::from_secs(10), || restfs::stats::read(&pa).is_ok_and(|s| s.delegated));
    std::fs::write(pa.join("f"), b"0123456789").unwrap();
    std::fs::write(pa.join("lockfile"), b"").unwrap();
    let fa = open_rw(&pa.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    fcntl(&fa, libc::F_SETLK, libc::F_UNLCK, 10, 10).unwrap();
    let (la, la2) = (File::open(pa.join("lockfile")).unwrap(), File::open(pa.join("lockfile")).unwrap());
    flock(&la, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    refused(flock(&la2, libc::LOCK_SH | libc::LOCK_NB));
    assert_eq!(server.counter_or_zero("requests.lock.set"), 0, "locks went to the server under the delegation");

    let (pb, _b) = second_mount(&server, &root);
    let fb = open_rw(&pb.join("f"));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_RDLCK, 0, 10));
    fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 10, 10).unwrap();
    refused(fcntl(&fb, libc::F_SETLK, libc::F_RDLCK, 20, 80));
    let lb = File::open(pb.join("lockfile")).unwrap();
    refused(flock(&lb, libc::LOCK_SH | libc::LOCK_NB));
    drop(la);
    // The kernel sends the release of a closed file in the background.
    wait_until("the flock goes with its file", Duration::from_secs(5), || flock(&lb, libc::LOCK_SH | libc::LOCK_NB).is_ok());
    drop(fa);
    fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    drop(la2);
    a.unmount();
}

/// The server forgets every lock when it restarts; each mount takes its
/// own again on reconnecting, and for a grace period after the restart
/// nobody else can take a lock first.
#[test]
fn locks_are_taken_again_after_a_server_restart() {
    let (mut server, pa, pb, a, _b) = two_mounts("e2e-locks-restart", "");
    std::fs::write(pa.join("f"), b"x").unwrap();
    let mut holder = hold_lock(&pa.join("f"));
    let fb = open_rw(&pb.join("f"));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    server.stop();
    // A reconnects a second later than B: B's tries reach the new server first.
    a.signal(libc::SIGSTOP);
    let prober = keep_trying_to_lock(&fb, Duration::from_millis(2500));
    assert!(server.spawn(), "restfsd could not start again");
    // Asked before A is back, F_GETLK waits for it rather than miss its lock.
    let fb2 = fb.try_clone().unwrap();
    let asker = std::thread::spawn(move || fcntl(&fb2, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap().l_type as i32);
    std::thread::sleep(Duration::from_secs(1));
    a.signal(libc::SIGCONT);
    match prober.join().unwrap() {
        Ok(tries) => assert!(tries > 100, "B tried only {tries} times"),
        Err(tries) => panic!("B took A's lock at its try {tries}, before A took it again"),
    }
    assert_eq!(asker.join().unwrap(), libc::F_WRLCK, "F_GETLK asked before A was back missed its lock");
    assert!(!a.log().contains("is lost"), "A lost its lock: {}", a.log());
    assert_eq!(fcntl(&fb, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap().l_type as i32, libc::F_WRLCK, "A's lock is held again");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    wait_until("A's lock goes with its holder", Duration::from_secs(10), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
}

/// A lock taken under the delegation (the server never heard of it) stays
/// its holder's across a server restart: a mount arriving while the holder
/// is not back yet cannot take it.
#[test]
fn a_lock_taken_under_the_delegation_survives_a_server_restart() {
    let (mut server, root, pa, a) = one_mount("e2e-locks-delegated-restart", "");
    wait_until("the delegation", Duration::from_secs(10), || restfs::stats::read(&pa).is_ok_and(|s| s.delegated));
    let f = File::create(pa.join("f")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut holder = hold_lock(&pa.join("f"));
    assert_eq!(server.counter_or_zero("requests.lock.set"), 0, "the lock went to the server under the delegation");
    server.stop();
    a.signal(libc::SIGSTOP);
    assert!(server.spawn(), "restfsd could not start again");
    let (pb, _b) = second_mount(&server, &root);
    let fb = open_rw(&pb.join("f"));
    let prober = keep_trying_to_lock(&fb, Duration::from_millis(2500));
    std::thread::sleep(Duration::from_secs(1));
    a.signal(libc::SIGCONT);
    match prober.join().unwrap() {
        Ok(tries) => assert!(tries > 100, "B tried only {tries} times"),
        Err(tries) => panic!("B took A's lock at its try {tries}, before A took it again"),
    }
    assert!(!a.log().contains("is lost"), "A lost its lock: {}", a.log());
    assert_eq!(fcntl(&fb, libc::F_GETLK, libc::F_RDLCK, 0, 0).unwrap().l_type as i32, libc::F_WRLCK, "A's lock is held again");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    wait_until("A's lock goes with its holder", Duration::from_secs(10), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
}

/// A process holding a write lock on all of `path` until its stdin closes.
/// Another process: this one starts restfsd, and a child inheriting a
/// descriptor on a frozen mount would wait on it.
fn hold_lock(path: &std::path::Path) -> std::process::Child {
    let script = "import fcntl, sys\nf = open(sys.argv[1], 'r+b')\nfcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('locked', flush=True)\nsys.stdin.read()\n";
    let mut holder = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().unwrap()), &mut said).unwrap();
    assert_eq!(said.trim(), "locked");
    holder
}

/// Try `F_SETLK` on `f` every millisecond for `how_long`, in a thread: the
/// number of tries, or the try that took the lock (as an error).
fn keep_trying_to_lock(f: &File, how_long: Duration) -> std::thread::JoinHandle<Result<u32, u32>> {
    let f = f.try_clone().unwrap();
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + how_long;
        let mut tries = 0;
        while std::time::Instant::now() < until {
            if fcntl(&f, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok() {
                return Err(tries);
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(tries)
    })
}

/// A mount whose connection broke on its side while the server's side
/// stayed open (a failed network path) takes its locks again on its new
/// connection: the server closes the old one for it, and nobody else gets
/// the lock in between or after.
#[test]
fn locks_are_taken_again_after_a_connection_breaks_on_the_clients_side() {
    let (_server, proxy, pa, pb, a, _b) = two_mounts_a_relayed("e2e-locks-cut");
    std::fs::write(pa.join("f"), b"x").unwrap();
    let fa = open_rw(&pa.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let fb = open_rw(&pb.join("f"));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    // B keeps trying all along: it must never get the lock.
    let prober = keep_trying_to_lock(&fb, Duration::from_secs(2));
    // The old connection goes for good; A's lock must not go with it.
    break_clients_side(&proxy, &a);
    match prober.join().unwrap() {
        Ok(tries) => assert!(tries > 100, "B tried only {tries} times"),
        Err(tries) => panic!("B took A's lock at its try {tries}, while A reconnected"),
    }
    assert!(!a.log().contains("is lost"), "A lost its lock: {}", a.log());
    drop(fa);
    wait_until("A's lock goes with its close", Duration::from_secs(5), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
}

/// A mount silent past its lease (frozen here; cut off by the network
/// alike) loses its locks, so it cannot hold everyone else up for ever;
/// thawed, it learns that its lock is gone.
#[test]
fn the_locks_of_a_mount_silent_past_its_lease_go() {
    let (_server, pa, pb, a, _b) = two_mounts("e2e-locks-silent", "");
    std::fs::write(pa.join("f"), b"x").unwrap();
    let fa = open_rw(&pa.join("f"));
    fcntl(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).unwrap();
    let fb = open_rw(&pb.join("f"));
    refused(fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    a.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    wait_until("B takes the lock of the frozen A", Duration::from_secs(20), || fcntl(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
    let waited = frozen.elapsed();
    a.signal(libc::SIGCONT);
    assert!(waited >= Duration::from_secs(3), "A's lock went after {waited:?}, within its lease");
    wait_until("A hears that its lock is lost", Duration::from_secs(20), || a.log().contains("is lost"));
    drop(fa);
}

/// Locks taken on the server, then changed under a delegation granted
/// later: the recall hands the server every holder's new locks, after
/// dropping all the old ones (one holder's new lock may sit where
/// another's old one was).
#[test]
fn locks_moved_between_holders_under_the_delegation_reach_the_server() {
    let (server, root, pa, a) = one_mount("e2e-locks-moved", "");
    let delegated =
        |want: bool| wait_until("the delegation", Duration::from_secs(10), || restfs::stats::read(&pa).is_ok_and(|s| s.delegated == want));
    delegated(true);
    std::fs::write(pa.join("lockfile"), b"").unwrap();
    let (pb, b) = second_mount(&server, &root);
    delegated(false);
    let (first, second) = (File::open(pa.join("lockfile")).unwrap(), File::open(pa.join("lockfile")).unwrap());
    flock(&first, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    b.unmount();
    delegated(true);
    flock(&first, libc::LOCK_UN).unwrap();
    flock(&second, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    let (pb, _b) = (pb.clone(), Mount::new(&server, "shared", &pb, &format!("cache_dir={}", root.join("cache-b").display())));
    let other = File::open(pb.join("lockfile")).unwrap();
    refused(flock(&other, libc::LOCK_SH | libc::LOCK_NB));
    drop(second);
    wait_until("the flock goes with its file", Duration::from_secs(5), || flock(&other, libc::LOCK_SH | libc::LOCK_NB).is_ok());
    drop(first);
    a.unmount();
}

/// SQLite, which guards its database with `fcntl` locks, shared by
/// writers on two mounts: each transaction reads the largest value and
/// inserts the next one (a unique column), so a transaction that missed
/// another's commit fails. Every row arrives, each value once.
#[test]
fn sqlite_writers_on_two_mounts_see_each_others_commits() {
    let (_server, pa, pb, _a, _b) = two_mounts("e2e-locks-sqlite", "");
    let setup = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('create table t(id integer primary key, who text, v integer unique)'); c.commit()";
    run(std::process::Command::new("python3").args(["-c", setup]).arg(pa.join("shared.db")));
    let writer = r#"
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=60)
for i in range(int(sys.argv[3])):
    while True:
        try:
            c.execute("begin immediate")
            v = c.execute("select coalesce(max(v), 0) from t").fetchone()[0]
            c.execute("insert into t(who, v) values (?, ?)", (sys.argv[2], v + 1))
            c.commit()
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise
            time.sleep(0.01)
"#;
    let spawn = |db: std::path::PathBuf, who: &str| {
        std::process::Command::new("python3").args(["-c", writer]).arg(db).args([who, "150"]).spawn().unwrap()
    };
    let mut writers = vec![spawn(pa.join("shared.db"), "a"), spawn(pb.join("shared.db"), "b"), spawn(pb.join("shared.db"), "c")];
    for w in &mut writers {
        assert!(w.wait().unwrap().success(), "a writer failed (see its output above)");
    }
    let check = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute('select count(*), count(distinct v), max(v) from t').fetchone(), c.execute('pragma integrity_check').fetchone()[0])";
    for p in [&pa, &pb] {
        let out = std::process::Command::new("python3").args(["-c", check]).arg(p.join("shared.db")).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "(450, 450, 450) ok",
            "on {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
