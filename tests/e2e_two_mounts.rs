//! Two mounts of one bucket, each with its own cache directory:
//! close-to-open consistency. After close() returns on A, an open() on B
//! sees exactly what A wrote, even when B read an older version before.

mod common;

use common::*;
use std::io::Write;

#[test]
fn close_on_one_mount_then_open_on_the_other_sees_the_data() {
    let root = scratch("e2e-two");
    let server = Server::start(&root.join("data"));
    server.create_bucket("shared");
    let (pa, pb) = (root.join("a"), root.join("b"));
    let a = Mount::new(&server, "shared", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    let b = Mount::new(&server, "shared", &pb, &format!("cache_dir={}", root.join("cache-b").display()));

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
