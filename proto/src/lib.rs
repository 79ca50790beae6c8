//! `restfs-proto`: the RestFS wire protocol, shared by client and server.
//!
//! JSON-RPC 2.0 over one WebSocket. Text frames carry JSON, binary frames
//! carry BSON documents of the same shape; block payloads travel as BSON
//! binary. The first call on a connection is `hello`, which negotiates the
//! protocol version, the encoding and the capabilities. This crate holds
//! types and codecs only, no IO.

pub mod acl;
pub mod bytes;
pub mod credentials;
pub mod errno;
pub mod locks;
pub mod methods;
pub mod rpc;
pub mod types;

pub use bytes::{Bytes, Hash, Name};
pub use errno::Errno;
pub use methods::{Encoding, Method};
pub use rpc::{Id, RpcError};
pub use types::*;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest WebSocket message either side accepts: 32 MiB. A larger frame is
/// answered with a `FRAME_TOO_LARGE` error and the connection is closed.
pub const MAX_FRAME: usize = 32 << 20;

/// Largest block size a bucket may use: 8 MiB (a `block.put` of a few of
/// them fits in one frame).
pub const MAX_BLOCK_SIZE: u32 = 8 << 20;

/// Default block size of a new bucket: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;

/// Default blocks per segment: 64 (64 MiB of file per block-map transfer).
pub const DEFAULT_SEGMENT_BLOCKS: u32 = 64;

/// Default TCP port of restfsd.
pub const DEFAULT_PORT: u16 = 7878;

/// Capability: the server pushes change notifications (later protocol work).
pub const CAP_PUSH: &str = "push";

/// Capability: callbacks. The client acknowledges every push it applied
/// (`push.ack`), and the server holds the reply to another connection's
/// change until the client has acknowledged it or its lease ran out. A
/// client whose lease is current may therefore answer opens from its
/// caches and still see every change closed elsewhere (close-to-open).
pub const CAP_CALLBACKS: &str = "callbacks";

/// Capability: the server applies the umask each create carries (unless
/// the directory has a default ACL) and keeps POSIX ACLs tied to the mode
/// (see `acl`). Without it a client leaves the umask to the kernel and
/// does without ACLs.
pub const CAP_ACL: &str = "acl";

/// Capability: the client marks the locks it takes again after a
/// reconnection (`reclaim`). Just after a restart the server grants only
/// those; a client without it has each of its lock requests taken as one.
pub const CAP_RECLAIM: &str = "lock-reclaim";
