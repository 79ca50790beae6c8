//! Commits a previous session journaled but never saw acknowledged (it
//! crashed, or lost the server for good) are completed at the next mount:
//! their blocks were staged in the disk cache, and the commit is applied
//! only to the file version it was made on.

use super::error::{FsError, Result};
use super::{Fs, file, remote};
use restfs_proto::Errno;
use restfs_proto::methods::{GetAttr, InoParams, SegmentCommit};
use std::sync::Arc;

impl Fs {
    /// Complete the commits a previous session journaled but never saw
    /// acknowledged (it crashed, or lost the server for good). A commit is
    /// applied only to the version it was made on; the blocks come from the
    /// disk cache, where they were staged. Returns how many were completed.
    pub async fn recover_unacked(&self) -> usize {
        let Some(meta) = self.meta.as_deref() else { return 0 };
        let mut completed = 0;
        for (ino, record) in meta.unacked().unwrap_or_default() {
            match self.recover_one(&record).await {
                Ok(true) => {
                    tracing::info!("completed the unacknowledged commit of inode {ino} from the last session");
                    completed += 1;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot complete the unacknowledged commit of inode {ino} from the last session: {e}"),
            }
            self.forget(|m| m.clear_unacked(ino));
        }
        completed
    }

    async fn recover_one(&self, record: &str) -> Result<bool> {
        let rec: file::Unacked =
            serde_json::from_str(record).map_err(|e| FsError::new(Errno::EIO, format!("unreadable journal record: {e}")))?;
        let ino = rec.commit.ino;
        let now = self.link().call::<GetAttr>(InoParams { ino }).await?;
        if now.version != rec.base_version {
            tracing::warn!(
                "inode {ino} changed on the server (version {} is now {}): its unacknowledged commit is dropped",
                rec.base_version,
                now.version
            );
            return Ok(false);
        }
        let ring = self.remote.ring.as_ref().ok_or_else(|| FsError::new(Errno::EIO, "no disk cache"))?;
        let mut staged = Vec::new();
        for slot in &rec.commit.slots {
            if let Some((hash, _)) = slot.block {
                let data =
                    ring.get(&hash).ok_or_else(|| FsError::new(Errno::EIO, format!("block {hash} is no longer in the disk cache")))?;
                staged.push(remote::Staged { index: slot.index, hash, data: Arc::new(data), pinned: false });
            }
        }
        self.remote.send(&staged).await?;
        let fresh = self.link().call::<SegmentCommit>(rec.commit).await?;
        self.merge(&fresh);
        Ok(true)
    }
}
