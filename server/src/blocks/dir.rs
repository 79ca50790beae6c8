//! [`BlockStore`] in a local directory.
//!
//! A block lives at `blocks/ab/cd/<hex hash>`. A put writes a temporary file
//! in `tmp/`, fsyncs it, renames it into place and fsyncs the shard
//! directory, so a crash leaves either the whole block or none of it (stray
//! temporaries are swept at open).

use super::BlockStore;
use crate::error::{Error, Result};
use restfs_proto::{Errno, Hash};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct DirBlocks {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl DirBlocks {
    pub fn open(root: &Path) -> Result<DirBlocks> {
        fs::create_dir_all(root.join("blocks"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        Ok(DirBlocks { root: root.to_path_buf(), tmp_seq: AtomicU64::new(0) })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("blocks").join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl BlockStore for DirBlocks {
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<()> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(());
        }
        let shard = path.parent().expect("block paths have a parent");
        if !shard.exists() {
            fs::create_dir_all(shard)?;
            fsync_dir(shard.parent().expect("shards have a parent"))?;
        }
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}.{}.{n}", hash.to_hex(), std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        fsync_dir(shard)
    }

    fn get(&self, hash: &Hash) -> Result<Vec<u8>> {
        match fs::read(self.path(hash)) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::fs(Errno::ENOENT, format!("block {hash} missing from the block store")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn has(&self, hash: &Hash) -> Result<bool> {
        Ok(self.path(hash).exists())
    }

    fn delete(&self, hash: &Hash) -> Result<()> {
        match fs::remove_file(self.path(hash)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn space(&self) -> Result<(u64, u64)> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).map_err(|_| Error::Corrupt("NUL in data path".into()))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let frsize = st.f_frsize as u64;
        Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
    }
}
