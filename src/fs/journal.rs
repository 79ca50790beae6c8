//! The write-ahead log of changes answered under the delegation: each one
//! is appended before it is answered, so a crash of the mount daemon loses
//! none of them (DESIGN.md: dirty state lives on disk until acknowledged).
//! The next mount sends what the server never acknowledged. Writes go to
//! the page cache, which outlives the process; `fsync` covers a machine
//! crash by waiting for the server instead.
//!
//! Records: a tag byte, a little-endian u32 length, then the body: an op's
//! BSON; the count of ops acknowledged; or, before a batch is sent, its
//! count and token. A torn record at the end (the crash came mid-write) is
//! ignored: its op was never answered. The batch in flight at a crash may
//! or may not have been applied: the next mount sends it again under the
//! same token, and the server, which remembers tokens, applies it once.

use restfs_proto::methods::BatchOp;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const OP: u8 = 1;
const ACKED: u8 = 2;
const SENDING: u8 = 3;

/// What a previous mount left: the ops never acknowledged, in order, and
/// the batch in flight (its token and how many of them it held), if any.
#[derive(Debug, Default)]
pub struct Leftover {
    pub ops: Vec<BatchOp>,
    pub in_flight: Option<(String, usize)>,
}

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Nothing is logged since the last truncation.
    empty: bool,
    /// Bytes of whole records written since the last truncation.
    len: u64,
    /// A change could not be logged (a full disk, say): the log takes no
    /// more changes until the queue is idle (see [`Journal::is_off`]).
    off: bool,
    /// A batch or acknowledgement record could not be written either: the
    /// log was emptied and takes nothing until the queue is idle.
    dropped: bool,
}

fn record(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// What a log holds that was never acknowledged.
fn unacknowledged(bytes: &[u8]) -> Leftover {
    let (mut ops, mut acked, mut in_flight, mut at) = (Vec::new(), 0usize, None, 0usize);
    while at + 5 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 1..at + 5].try_into().expect("four bytes")) as usize;
        let Some(body) = bytes.get(at + 5..at + 5 + len) else { break };
        match bytes[at] {
            OP => match bson::deserialize_from_slice::<BatchOp>(body) {
                Ok(op) => ops.push(op),
                Err(e) => {
                    tracing::warn!("unreadable record in the delegation log: {e}");
                    break;
                }
            },
            ACKED if len == 8 => {
                acked += u64::from_le_bytes(body.try_into().expect("eight bytes")) as usize;
                in_flight = None;
            }
            SENDING if len >= 8 => {
                let n = u64::from_le_bytes(body[..8].try_into().expect("eight bytes")) as usize;
                in_flight = Some((String::from_utf8_lossy(&body[8..]).into_owned(), n));
            }
            _ => break,
        }
        at += 5 + len;
    }
    let ops = ops.split_off(acked.min(ops.len()));
    let in_flight = in_flight.map(|(token, n)| (token, n.min(ops.len())));
    Leftover { ops, in_flight }
}

impl Journal {
    /// Open the log at `path`; returns it with the ops a previous mount
    /// logged but never saw acknowledged (still in the file until [`Journal::clear`]).
    pub fn open(path: &Path) -> io::Result<(Journal, Leftover)> {
        let left = match std::fs::read(path) {
            Ok(bytes) => unacknowledged(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Leftover::default(),
            Err(e) => return Err(e),
        };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        // `empty` only when the file is: a leftover with nothing unacknowledged
        // (or a torn tail) must still be cut by `clear`.
        Ok((Journal { file, path: path.to_owned(), empty: len == 0, len, off: false, dropped: false }, left))
    }

    /// The log could not take a record and is off: changes must not be
    /// answered before the server has them until the queue is idle.
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// Append a record. One that cannot be written may be torn: the log is
    /// cut back to its whole records. A change that cannot be logged turns
    /// the log off (the caller makes its answer wait for the server). A
    /// missing batch or acknowledgement record would make a replay apply
    /// acknowledged changes again: then the whole log is dropped (what is
    /// queued lives in memory only until the queue is idle).
    fn write(&mut self, tag: u8, body: &[u8]) -> io::Result<()> {
        if self.dropped || (self.off && tag == OP) {
            return Ok(());
        }
        let rec = record(tag, body);
        match self.file.write_all(&rec) {
            Ok(()) => {
                self.empty = false;
                self.len += rec.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.off = true;
                let cut = if tag == OP { self.len } else { 0 };
                if cut == 0 || self.file.set_len(cut).is_err() {
                    self.dropped = true;
                    self.file.set_len(0)?;
                    self.len = 0;
                    self.empty = true;
                }
                Err(e)
            }
        }
    }

    /// Log `op` before it is answered.
    pub fn append(&mut self, op: &BatchOp) -> io::Result<()> {
        let body = bson::serialize_to_vec(op).map_err(io::Error::other)?;
        self.write(OP, &body)
    }

    /// The next `n` ops go to the server as the batch named `token`.
    pub fn sending(&mut self, token: &str, n: u64) -> io::Result<()> {
        let mut body = n.to_le_bytes().to_vec();
        body.extend_from_slice(token.as_bytes());
        self.write(SENDING, &body)
    }

    /// The server acknowledged the next `n` ops; `idle`: none is left.
    pub fn acked(&mut self, n: u64, idle: bool) -> io::Result<()> {
        if idle { self.clear() } else { self.write(ACKED, &n.to_le_bytes()) }
    }

    /// Another handle on the log's file, to sync it without holding the log.
    pub fn handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Start over: everything logged is acknowledged (and the log is on again).
    pub fn clear(&mut self) -> io::Result<()> {
        if !self.empty {
            self.file.set_len(0)?;
            self.empty = true;
        }
        self.len = 0;
        self.off = false;
        self.dropped = false;
        Ok(())
    }

    /// Keep what a previous mount left (it could not be sent) under another
    /// name, for an administrator, and start over.
    pub fn set_aside(&mut self) -> io::Result<PathBuf> {
        let kept = self.path.with_extension(format!("unsent-{}", restfs_proto::Timespec::now().sec));
        std::fs::copy(&self.path, &kept)?;
        self.clear()?;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restfs_proto::methods::EntryParams;
    use restfs_proto::{Name, Timespec};

    fn unlink(i: u64) -> BatchOp {
        BatchOp::Unlink {
            at: Timespec { sec: i as i64, nsec: 0 },
            entry: EntryParams { parent: 1, name: Name::from(format!("f{i}").as_bytes()) },
        }
    }

    fn names(ops: &[BatchOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                BatchOp::Unlink { entry, .. } => String::from_utf8_lossy(entry.name.as_bytes()).into_owned(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_crash_leaves_exactly_the_unacknowledged_ops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delegated.log");
        let (mut j, left) = Journal::open(&path).unwrap();
        assert!(left.ops.is_empty() && left.in_flight.is_none());
        for i in 0..5 {
            j.append(&unlink(i)).unwrap();
        }
        j.sending("t1", 2).unwrap();
        j.acked(2, false).unwrap();
        j.append(&unlink(5)).unwrap();
        j.sending("t2", 1).unwrap();
        j.acked(1, false).unwrap();
        j.sending("t3", 2).unwrap();
        drop(j);
        // A torn record at the end: its op was never answered.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[OP, 200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut j, left) = Journal::open(&path).unwrap();
        assert_eq!(names(&left.ops), ["f3", "f4", "f5"]);
        assert_eq!(left.in_flight, Some(("t3".to_string(), 2)), "the batch in flight is sent again under its token");
        j.clear().unwrap();
        assert!(Journal::open(&path).unwrap().1.ops.is_empty());
    }

    #[test]
    fn an_idle_queue_truncates_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delegated.log");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&unlink(1)).unwrap();
        j.acked(1, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        j.append(&unlink(2)).unwrap();
        let kept = j.set_aside().unwrap();
        let left = Journal::open(&kept).unwrap().1;
        assert_eq!((names(&left.ops), left.in_flight), (vec!["f2".to_string()], None));
        assert!(Journal::open(&path).unwrap().1.ops.is_empty());
    }
}
