//! The block store: immutable blocks addressed by their SHA-256.
//!
//! Blocks above [`INLINE_MAX`] bytes live here, in a local directory
//! ([`dir`], the default) or an S3-compatible bucket ([`s3`]); smaller ones are kept inline
//! by the metadata store, so small files cost no file create or fsync of
//! their own. A `put` returns only once the block is durable, so a commit
//! naming it can never outlive it. Every backend passes [`conformance`].

pub mod dir;
pub mod s3;

#[cfg(test)]
pub mod conformance;

use crate::error::Result;
use restfs_proto::Hash;
use std::io::Write;
use std::path::Path;

/// Largest block kept inline in the metadata store: 64 KiB.
pub const INLINE_MAX: usize = 64 << 10;

pub trait BlockStore: Send + Sync {
    /// Store a block durably; storing one already present is a no-op.
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<()>;
    /// A block's bytes; ENOENT if absent.
    fn get(&self, hash: &Hash) -> Result<Vec<u8>>;
    fn has(&self, hash: &Hash) -> Result<bool>;
    /// Remove a block; removing an absent one is a no-op.
    fn delete(&self, hash: &Hash) -> Result<()>;
    /// Free and total bytes of the space behind the store.
    fn space(&self) -> Result<(u64, u64)>;
}

/// Where a data directory's blocks live, as `DATA/blocks.location` names
/// it: `directory`, or `s3://BUCKET/PREFIX/`.
const LOCATION_FILE: &str = "blocks.location";

/// The data directory's id (see [`s3::S3Blocks::claim`]).
const ID_FILE: &str = "id";

/// The location of the blocks in the data directory itself.
pub const IN_DATA_DIR: &str = "directory";

/// The block location the data directory `data` is bound to, if any. A
/// data directory from before the file existed, with blocks under
/// `blocks/`, is bound to them.
fn bound_location(data: &Path) -> std::result::Result<Option<String>, String> {
    let path = data.join(LOCATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.lines().next().unwrap_or_default().trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let shards = std::fs::read_dir(data.join("blocks")).map(|mut d| d.next().is_some()).unwrap_or(false);
            Ok(shards.then(|| IN_DATA_DIR.to_string()))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Refuse `location` if the data directory `data` is bound to another: its
/// metadata names blocks that only that store holds.
pub fn check_location(data: &Path, location: &str) -> std::result::Result<(), String> {
    match bound_location(data)? {
        Some(b) if b != location => {
            let flag = if b == IN_DATA_DIR { "no --blocks".to_string() } else { format!("--blocks {}", b.trim_end_matches('/')) };
            Err(format!("the blocks of {} are in {b}, not {location}: start restfsd with {flag}", data.display()))
        }
        _ => Ok(()),
    }
}

/// Bind the data directory `data` to `location` (checked first with
/// [`check_location`]), once the store there answered.
pub fn bind_location(data: &Path, location: &str) -> std::result::Result<(), String> {
    let path = data.join(LOCATION_FILE);
    if path.exists() {
        return Ok(());
    }
    write_durably(&path, &format!("{location}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The data directory's id, drawn at its first start.
pub fn data_dir_id(data: &Path) -> std::result::Result<String, String> {
    let path = data.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) => Ok(id.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_id().map_err(|e| format!("cannot draw an id: {e}"))?;
            write_durably(&path, &format!("{id}\n")).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// 128 random bits, in hex.
fn new_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Write a small file whole: a temporary file, fsync'd, renamed into place,
/// the directory fsync'd.
fn write_durably(path: &Path, text: &str) -> std::io::Result<()> {
    let fresh = path.with_extension("new");
    let mut f = std::fs::File::create(&fresh)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&fresh, path)?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_keeps_the_block_location_it_started_with() {
        let data = tempfile::tempdir().unwrap();
        check_location(data.path(), "s3://b/p/").unwrap();
        bind_location(data.path(), "s3://b/p/").unwrap();
        check_location(data.path(), "s3://b/p/").unwrap();
        let refused = check_location(data.path(), IN_DATA_DIR).unwrap_err();
        assert!(refused.contains("start restfsd with --blocks s3://b/p"), "{refused}");

        // From before the file: blocks in the directory bind it there.
        let old = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(old.path().join("blocks/ab")).unwrap();
        let refused = check_location(old.path(), "s3://b/").unwrap_err();
        assert!(refused.contains("start restfsd with no --blocks"), "{refused}");
        check_location(old.path(), IN_DATA_DIR).unwrap();
    }

    #[test]
    fn a_data_directory_keeps_its_id() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = data_dir_id(one.path()).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(data_dir_id(one.path()).unwrap(), id);
        assert_ne!(data_dir_id(two.path()).unwrap(), id, "two data directories drew one id");
    }
}
