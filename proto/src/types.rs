//! Shared data types: attributes, times, buckets, block references.

use crate::bytes::{Hash, Name};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An inode number inside one bucket. The root directory is [`ROOT_INO`].
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Seconds and nanoseconds since the Unix epoch (may be negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn now() -> Timespec {
        Timespec::from(SystemTime::now())
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs()) + Duration::from_nanos(self.nsec as u64)
        }
    }
}

impl From<SystemTime> for Timespec {
    fn from(t: SystemTime) -> Timespec {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                let (sec, nsec) = (d.as_secs() as i64, d.subsec_nanos());
                if nsec == 0 { Timespec { sec: -sec, nsec: 0 } } else { Timespec { sec: -sec - 1, nsec: 1_000_000_000 - nsec } }
            }
        }
    }
}

/// The type of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind encoded in a full `st_mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// POSIX attributes of an object. `mode` holds the permission bits only
/// (`0o7777`); the type is `kind`. `version` changes with every data commit,
/// so a client can tell whether its cached content is still current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub rdev: u32,
    pub version: u64,
}

/// A timestamp to set: the server's clock, or a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// Public description of a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    pub name: String,
    /// Block size in bytes; blocks are the unit of hashing, dedup and transfer.
    pub block_size: u32,
    /// Blocks per segment; a segment is the unit of block-map transfer.
    pub segment_blocks: u32,
    pub created: Timespec,
    /// Number of objects (files, directories, links), the root included.
    pub objects: u64,
    /// Sum of file sizes in bytes.
    pub bytes: u64,
}

/// One entry of a file's block map: block `index` holds `len` valid bytes of
/// the block `hash`; bytes of the block past `len` read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub index: u64,
    pub hash: Hash,
    pub len: u32,
}

/// A change to one block-map slot at commit: a block, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSlot {
    pub index: u64,
    /// `None` punches a hole.
    pub block: Option<(Hash, u32)>,
}

/// A directory entry with the attributes of what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Name,
    pub attr: Attr,
}

/// Largest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes.
pub const PATH_MAX: usize = 4095;
/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65000;
/// How long a server answers a repeated non-idempotent request (same
/// client, same id) from its replay cache instead of applying it again: a
/// client must not resend a request older than this.
pub const REPLAY_KEEP_SECS: u64 = 3600;
/// Largest xattr value, in bytes (as Linux).
pub const XATTR_SIZE_MAX: usize = 65536;

/// Why a name is not a valid directory entry name.
pub fn check_name(name: &[u8]) -> Result<(), crate::Errno> {
    if name.len() > NAME_MAX {
        return Err(crate::Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(crate::Errno::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespec_round_trips_negative_times() {
        for t in [Timespec { sec: -1, nsec: 5 }, Timespec { sec: 0, nsec: 0 }, Timespec { sec: 1_700_000_000, nsec: 999 }] {
            assert_eq!(Timespec::from(t.to_system_time()), t);
        }
    }

    #[test]
    fn names() {
        assert!(check_name(b"ok").is_ok());
        assert!(check_name(&[0xff; 255]).is_ok());
        assert_eq!(check_name(&[b'a'; 256]), Err(crate::Errno::ENAMETOOLONG));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_eq!(check_name(bad), Err(crate::Errno::EINVAL), "{bad:?}");
        }
    }
}
