//! The behaviour every [`BlockStore`] backend must show.

use super::BlockStore;
use restfs_proto::{Errno, Hash};

pub fn run_all(store: &dyn BlockStore) {
    put_get_round_trip(store);
    put_is_idempotent(store);
    missing_block_is_enoent(store);
    delete_removes_and_tolerates_absent(store);
    space_is_reported(store);
}

fn put_get_round_trip(s: &dyn BlockStore) {
    let data = vec![7u8; 100_000];
    let h = Hash::of(&data);
    assert!(!s.has(&h).unwrap());
    s.put(&h, &data).unwrap();
    assert!(s.has(&h).unwrap());
    assert_eq!(s.get(&h).unwrap(), data);
}

fn put_is_idempotent(s: &dyn BlockStore) {
    let data = b"twice".to_vec();
    let h = Hash::of(&data);
    s.put(&h, &data).unwrap();
    s.put(&h, &data).unwrap();
    assert_eq!(s.get(&h).unwrap(), data);
}

fn missing_block_is_enoent(s: &dyn BlockStore) {
    let h = Hash::of(b"never stored");
    assert_eq!(s.get(&h).unwrap_err().errno(), Errno::ENOENT);
}

fn delete_removes_and_tolerates_absent(s: &dyn BlockStore) {
    let data = b"short-lived".to_vec();
    let h = Hash::of(&data);
    s.put(&h, &data).unwrap();
    s.delete(&h).unwrap();
    assert!(!s.has(&h).unwrap());
    s.delete(&h).unwrap();
}

fn space_is_reported(s: &dyn BlockStore) {
    let (free, total) = s.space().unwrap();
    assert!(total > 0 && free <= total);
}

#[cfg(test)]
mod tests {
    use crate::blocks::s3::{S3Blocks, S3Location};
    use std::process::{Child, Command};

    #[test]
    fn dir_backend_conforms() {
        let tmp = tempfile::tempdir().unwrap();
        let store = super::super::dir::DirBlocks::open(tmp.path()).unwrap();
        super::run_all(&store);
    }

    /// s3s-fs (a real S3 server over a directory), as `scripts/test.sh`
    /// installs it, killed on drop.
    struct S3sFs(Child);

    impl Drop for S3sFs {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn s3s_fs(root: &std::path::Path, port: u16) -> S3sFs {
        let binary =
            std::env::var_os("S3S_FS").map(std::path::PathBuf::from).unwrap_or_else(|| dirs::home_dir().unwrap().join(".cargo/bin/s3s-fs"));
        assert!(
            binary.exists(),
            "s3s-fs is not installed: run scripts/test.sh, or `cargo install s3s-fs --locked --version 0.14.1 --features binary`"
        );
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "AK", "--secret-key", "conformance-secret"])
            .arg(root)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut server = S3sFs(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(server.0.try_wait().unwrap().is_none(), "s3s-fs exited (port {port} taken?)");
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        server
    }

    #[test]
    fn s3_backend_conforms() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("conformance")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let _server = s3s_fs(tmp.path(), port);
        let env = |k: &str| match k {
            "AWS_ENDPOINT_URL" => Some(format!("http://127.0.0.1:{port}")),
            "AWS_ACCESS_KEY_ID" => Some("AK".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("conformance-secret".into()),
            _ => None,
        };
        let store = S3Blocks::open(&S3Location::parse("s3://conformance/some/prefix", env).unwrap()).unwrap();
        super::run_all(&store);
        // Blocks are objects under the prefix, and only there.
        let data = vec![3u8; 200_000];
        let hash = restfs_proto::Hash::of(&data);
        super::BlockStore::put(&store, &hash, &data).unwrap();
        let object = tmp.path().join("conformance/some/prefix").join(hash.to_hex());
        assert_eq!(std::fs::read(&object).unwrap(), data);
        // The store checks each upload against the block's name.
        let mut damaged = data.clone();
        damaged[1000] ^= 1;
        let refused = super::BlockStore::put(&store, &restfs_proto::Hash::of(b"another block"), &damaged).unwrap_err();
        assert!(refused.to_string().contains("BadDigest"), "{refused}");
    }
}
