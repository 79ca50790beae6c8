//! Directory handles: a snapshot of the listing taken at opendir (and again
//! at a read from the start if names changed since), so offsets stay stable
//! while the handle is read (entry `i` of the snapshot is at offset `i + 1`;
//! `.` and `..` come first).

use super::error::Result;
use crate::client::Link;
use restfs_proto::methods::{Readdir, ReaddirParams};
use restfs_proto::{DirEntry, Ino};

/// Entries fetched per `fs.readdir` call.
const PAGE: u32 = 1000;

pub struct DirSnapshot {
    pub ino: Ino,
    pub parent: Ino,
    pub entries: Vec<DirEntry>,
    /// The core's count of namespace changes when it was taken.
    pub taken_at: u64,
}

impl DirSnapshot {
    pub async fn fetch(link: &Link, ino: Ino, taken_at: u64) -> Result<DirSnapshot> {
        let mut entries: Vec<DirEntry> = Vec::new();
        let parent;
        loop {
            let after = entries.last().map(|e| e.name.clone());
            let page = link.call::<Readdir>(ReaddirParams { ino, after, limit: PAGE }).await?;
            entries.extend(page.entries);
            if !page.more {
                parent = page.parent;
                break;
            }
        }
        Ok(DirSnapshot { ino, parent, entries, taken_at })
    }
}
