//! `restfs`: the RestFS client.
//!
//! - [`client`]: the WebSocket JSON-RPC link to restfsd.
//! - [`fs`]: the filesystem core (POSIX operations over the link; no FUSE types).
//! - [`fuse`]: the thin fuser adapter over the core.
//! - [`mount`]: `mount.restfs` options and the mount lifecycle.
//! - [`admin`]: the `restfs` command line; [`bench`] and [`stats`] are two of its commands.

pub mod admin;
pub mod bench;
pub mod client;
pub mod fs;
pub mod fuse;
pub mod kernel_mount;
pub mod logging;
pub mod mount;
pub mod stats;
