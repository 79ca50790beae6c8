//! The server's error type: a filesystem errno with context, or a failure of
//! the machinery underneath (SQLite, disk). It converts to a JSON-RPC error.

use restfs_proto::{Errno, RpcError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A POSIX-level refusal (ENOENT, EEXIST, …), expected in normal use.
    #[error("{1}: {0}")]
    Fs(Errno, String),
    #[error("metadata store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("block store: {0}")]
    Io(#[from] std::io::Error),
    /// Stored state contradicts itself.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn fs(errno: Errno, what: impl Into<String>) -> Error {
        Error::Fs(errno, what.into())
    }

    pub fn errno(&self) -> Errno {
        match self {
            Error::Fs(e, _) => *e,
            Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => Errno(libc::ENOSPC),
            _ => Errno::EIO,
        }
    }
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Error {
        Error::Fs(e, e.name().unwrap_or("error").to_string())
    }
}

impl From<Error> for RpcError {
    fn from(e: Error) -> RpcError {
        RpcError::errno(e.errno(), e.to_string())
    }
}
