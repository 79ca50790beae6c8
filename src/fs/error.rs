//! The core's error type: an errno, plus what failed for the logs.

use restfs_proto::{Errno, RpcError};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    pub errno: Errno,
    pub context: String,
}

pub type Result<T> = std::result::Result<T, FsError>;

impl FsError {
    pub fn new(errno: Errno, context: impl Into<String>) -> FsError {
        FsError { errno, context: context.into() }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.errno)
    }
}

impl std::error::Error for FsError {}

impl From<Errno> for FsError {
    fn from(errno: Errno) -> FsError {
        FsError { errno, context: String::new() }
    }
}

impl From<RpcError> for FsError {
    fn from(e: RpcError) -> FsError {
        FsError { errno: e.as_errno(), context: e.message }
    }
}
