//! Mounting FUSE with the mount(2) system call, so the mount shows as
//! `fuse.restfs` (fuser's own mount always says `fuse`) and we own its
//! unmounting. Needs root (CAP_SYS_ADMIN); others go through fusermount.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

pub struct KernelMount<'a> {
    pub source: &'a str,
    pub subtype: &'a str,
    pub allow_other: bool,
    pub read_only: bool,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a mount argument"))
}

/// Open /dev/fuse and mount it at `mountpoint`; returns the session descriptor.
pub fn mount(m: &KernelMount<'_>, mountpoint: &Path) -> io::Result<OwnedFd> {
    let dev: OwnedFd = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?.into();
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions", dev.as_raw_fd());
    if m.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if m.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = cstring(m.source.as_bytes())?;
    let target = cstring(mountpoint.as_os_str().as_encoded_bytes())?;
    let fstype = cstring(format!("fuse.{}", m.subtype).as_bytes())?;
    let data = cstring(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dev)
}
