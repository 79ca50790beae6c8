//! The link rides out server outages: restfsd is stopped and restarted in
//! the middle of a copy, and the copy completes with no error visible to the
//! application and a byte-identical result.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn copy_survives_a_server_restart() {
    let root = scratch("e2e-reconnect");
    let mut server = Server::start(&root.join("data"));
    server.create_bucket("r");
    let mnt = root.join("mnt");
    let m = Mount::new(&server, "r", &mnt, &format!("cache_dir={}", root.join("cache").display()));

    let src = root.join("src");
    run(Command::new("cp").arg("-a").arg(registry_crate_tree()).arg(&src));
    let big: Vec<u8> = (0..24_000_000u32).map(|i| (i.wrapping_mul(2246822519) >> 11) as u8).collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();

    let (from, to) = (src.clone(), mnt.join("copy"));
    let copy = std::thread::spawn(move || Command::new("cp").arg("-a").arg(&from).arg(&to).output().unwrap());
    std::thread::sleep(Duration::from_millis(400));
    assert!(!copy.is_finished(), "the copy must still be running when the server stops");
    server.stop();
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    let out = copy.join().unwrap();
    assert!(out.status.success(), "cp failed across the restart: {}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&src, &mnt.join("copy"));
    let log = std::fs::read_to_string(mnt.with_extension("mount.log")).unwrap();
    assert!(log.contains("reconnected"), "the mount should have reconnected:\n{log}");
    m.unmount();
}

/// A file held open on one mount and unlinked by another is still readable
/// there after a server restart: restfsd removes the unlinked files left
/// open only once their clients, reconnecting, had the time to open them
/// again.
#[test]
fn a_file_held_open_survives_a_server_restart() {
    use std::io::Read;
    let (mut server, pa, pb, _a, _b) = two_mounts("e2e-reconnect-held-restart", "");
    let content = pattern_at(12, 0, 3 << 20);
    std::fs::write(pb.join("f"), &content).unwrap();
    let mut held = std::fs::File::open(pa.join("f")).unwrap();
    std::fs::remove_file(pb.join("f")).unwrap();
    server.restart();
    // Past the grace restfsd gives its clients (6 s).
    std::thread::sleep(Duration::from_secs(8));
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == content, "the file held open lost its content ({} bytes read)", got.len());
}

/// A file held open on a mount whose side of the connection broke (the
/// server's side stayed open), and unlinked meanwhile by another mount,
/// is still readable there after the reconnection: the new connection
/// takes over the old one's opens before the old one closes.
#[test]
fn a_file_held_open_survives_a_connection_broken_on_the_clients_side() {
    use std::io::Read;
    let (_server, proxy, pa, pb, a, _b) = two_mounts_a_relayed("e2e-reconnect-held");
    let content = pattern_at(11, 0, 3 << 20);
    std::fs::write(pb.join("f"), &content).unwrap();
    let mut held = std::fs::File::open(pa.join("f")).unwrap();
    std::fs::remove_file(pb.join("f")).unwrap();
    break_clients_side(&proxy, &a);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == content, "the file held open lost its content ({} bytes read)", got.len());
}
