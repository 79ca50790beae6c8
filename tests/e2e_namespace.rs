//! A mount sees its own namespace changes at once, even while the pushes
//! describing earlier changes are still on their way: a push older than a
//! reply must never undo it in the client's caches (the server queues the
//! pushes of earlier changes before a reply, and the client applies every
//! push received before a reply before caching what the reply says).

mod common;

use common::*;

fn churn(name: &str, options: &str) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket("ns");
    let mnt = root.join("mnt");
    let m = Mount::new(&server, "ns", &mnt, &format!("cache_dir={}{options}", root.join("cache").display()));
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
