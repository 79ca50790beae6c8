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
    #[test]
    fn dir_backend_conforms() {
        let tmp = tempfile::tempdir().unwrap();
        let store = super::super::dir::DirBlocks::open(tmp.path()).unwrap();
        super::run_all(&store);
    }
}
