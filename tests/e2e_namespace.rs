//! A mount sees its own namespace changes at once, even while the pushes
//! describing earlier changes are still on their way: a push older than a
//! reply must never undo it in the client's caches (the server queues the
//! pushes of earlier changes before a reply, and the client applies every
//! push received before a reply before caching what the reply says).

mod common;

use common::*;

fn churn(name: &str, options: &str) {
    let (_server, _root, mnt, m) = one_mount(name, options);
    let (f, g, d) = (mnt.join("f"), mnt.join("g"), mnt.join("d"));
    for round in 0..1500 {
        std::fs::write(&f, b"x").unwrap();
        assert!(f.exists(), "round {round}: created file missing");
        std::fs::rename(&f, &g).unwrap();
        assert!(!f.exists() && g.exists(), "round {round}: rename not seen");
        std::fs::remove_file(&g).unwrap();
        assert!(!g.exists(), "round {round}: unlinked file still found");
        std::fs::create_dir(&d).unwrap();
        std::fs::remove_dir(&d).unwrap();
        assert!(!d.exists(), "round {round}: removed directory still found");
    }
    m.unmount();
}

#[test]
fn a_mount_sees_its_own_namespace_changes_at_once() {
    churn("e2e-namespace", "");
}

#[test]
fn the_same_through_the_writeback_cache() {
    churn("e2e-namespace-wb", ",writeback");
}

#[test]
fn the_same_without_the_delegation() {
    churn("e2e-namespace-sync", ",nodelegate");
}

/// Renames and removals in a directory this mount knows whole are answered
/// by one request each: no lookup of the new name, no getattr of the
/// directory afterwards (its attributes come back with the reply).
#[test]
fn renames_and_removals_cost_one_request_each() {
    let root = scratch("e2e-namespace-requests");
    let server = Server::start(&root.join("data"));
    server.create_bucket("ns");
    let mnt = root.join("mnt");
    // Without the delegation, each change goes to the server as it is made.
    let m = Mount::new(&server, "ns", &mnt, &format!("cache_dir={},nodelegate", root.join("cache").display()));
    let dir = mnt.join("d");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..200 {
        std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
    let asked = |what: &str| server.counter(&format!("requests.fs.{what}"));
    let (lookups, getattrs) = (asked("lookup"), asked("getattr"));
    for i in 0..200 {
        std::fs::rename(dir.join(format!("f{i}")), dir.join(format!("g{i}"))).unwrap();
    }
    for i in 0..200 {
        std::fs::remove_file(dir.join(format!("g{i}"))).unwrap();
    }
    std::fs::remove_dir(&dir).unwrap();
    assert_eq!((asked("rename"), asked("unlink"), asked("rmdir")), (200, 200, 1));
    // A few may race with pushes and be asked again; not one per operation.
    let (lookups, getattrs) = (asked("lookup") - lookups, asked("getattr") - getattrs);
    assert!(lookups + getattrs <= 10, "{lookups} lookups and {getattrs} getattrs for 401 changes");
    m.unmount();
}

/// A name looked up absent is cached as absent by the kernel; once this
/// mount creates it, links it or renames onto it, the kernel holds the live
/// entry instead, and the mount stops counting that absence (which it would
/// otherwise take back later, dropping the live entry, by the thousand once
/// the count reached its bound).
#[test]
fn names_this_mount_creates_are_no_longer_held_absent() {
    claims("e2e-absent-claimed", "");
}

#[test]
fn the_same_without_the_delegation_for_names() {
    claims("e2e-absent-claimed-nd", ",nodelegate");
}

fn claims(name: &str, options: &str) {
    let (_server, _root, mnt, m) = one_mount(name, options);
    let absent = || restfs::stats::read(&mnt).unwrap().counters.get("absent_names").copied().unwrap_or(0);
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/source"), b"s").unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("n{i}")).collect();
    for name in &names {
        assert!(!mnt.join("dir").join(name).exists());
    }
    let held = absent();
    assert!(held >= 300, "300 absent names looked up, {held} held as absent");
    for (i, name) in names.iter().enumerate() {
        let path = mnt.join("dir").join(name);
        match i % 4 {
            0 => std::fs::write(&path, b"x").unwrap(),
            1 => std::fs::create_dir(&path).unwrap(),
            2 => std::fs::hard_link(mnt.join("dir/source"), &path).unwrap(),
            _ => {
                std::fs::write(mnt.join("dir/tmp"), b"y").unwrap();
                std::fs::rename(mnt.join("dir/tmp"), &path).unwrap();
            }
        }
    }
    let left = absent();
    assert!(left + 300 <= held, "{held} absent names before 300 creations, {left} after");
    m.unmount();
}

/// A directory handle opened before a change and read after it does not
/// leave the kernel an outdated listing (which it would keep for every
/// later `ls`): a read from the start takes a fresh snapshot.
#[test]
fn a_handle_read_after_a_change_leaves_no_stale_listing() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (_server, _root, mnt, m) = one_mount("e2e-stale-handle", "");
    let d = mnt.join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("old"), b"x").unwrap();
    let names = |dir: &std::path::Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        n.sort();
        n
    };
    for round in 0..20 {
        let path = CString::new(d.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; the handle is closed below.
        let handle = unsafe { libc::opendir(path.as_ptr()) };
        assert!(!handle.is_null());
        let new = format!("new{round}");
        std::fs::write(d.join(&new), b"x").unwrap();
        std::fs::metadata(&d).unwrap();
        let mut seen = 0;
        // SAFETY: reading the open handle to its end, then closing it.
        unsafe {
            while !libc::readdir(handle).is_null() {
                seen += 1;
            }
            libc::closedir(handle);
        }
        assert!(seen >= 3, "round {round}: the handle listed {seen} entries");
        assert!(names(&d).contains(&new), "round {round}: {new} missing from a later listing: {:?}", names(&d));
    }
    m.unmount();
}
