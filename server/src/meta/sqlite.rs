//! [`MetaStore`] on SQLite: one database file in WAL mode; each mutation
//! is atomic (a savepoint), and mutations are committed in groups.
//!
//! Group commit: a transaction stays open for up to [`GROUP_WINDOW`] and
//! takes every mutation made meanwhile; [`MetaStore::commit_group`] (called
//! by the service after that window) or the first mutation after it
//! commits. Writing the WAL once per group instead of once per mutation
//! was the largest part of the server's CPU in metadata-heavy work. Readers
//! share the one connection, so they see every mutation at once.
//!
//! Durability: commits run with `synchronous=NORMAL` (a crash of restfsd
//! loses at most the last [`GROUP_WINDOW`] of mutations; a power cut may
//! lose the last commits but never tears one). [`MetaStore::sync`] makes everything committed so far durable by
//! committing a marker under `synchronous=FULL`, which fsyncs the WAL, and
//! then checkpoints the WAL into the database (no commit checkpoints on its
//! own, so none stalls a request on fsyncs). The checkpoint truncates the
//! WAL: frames are not page-aligned, and rewriting a WAL whose pages the
//! kernel dropped made every commit read the file before writing it.
//!
//! Reference counts: each block-map slot naming a block is one reference.

use super::{BlockLocation, BucketId, ChangeLog, Changed, Garbage, IsOpen, Listing, MetaStore};
use crate::error::{Error, Result};
use restfs_proto::acl;
use restfs_proto::methods::{NewNodeParams, RenameParams, SetAttrParams, XattrMode};
use restfs_proto::{
    Attr, BlockRef, BlockSlot, BucketInfo, DirEntry, Errno, Hash, Ino, Kind, LINK_MAX, Name, ROOT_INO, SetTime, Timespec, XATTR_SIZE_MAX,
    check_name,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::sync::Mutex;

/// Longest a group of mutations stays uncommitted.
pub const GROUP_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

/// Version of [`SCHEMA`], kept in SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS buckets(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    block_size INTEGER NOT NULL,
    segment_blocks INTEGER NOT NULL,
    created_s INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    next_ino INTEGER NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    log_start INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS changes(
    bucket INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    name BLOB
);
CREATE INDEX IF NOT EXISTS changes_by_seq ON changes(bucket, seq);
CREATE TABLE IF NOT EXISTS inodes(
    bucket INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime_s INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    mtime_s INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_s INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    target BLOB,
    PRIMARY KEY(bucket, ino)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes(nlink) WHERE nlink = 0;
CREATE TABLE IF NOT EXISTS dentries(
    bucket INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY(bucket, parent, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blockmap(
    bucket INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    len INTEGER NOT NULL,
    PRIMARY KEY(bucket, ino, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks(
    hash BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    created INTEGER NOT NULL,
    data BLOB
);
CREATE INDEX IF NOT EXISTS blocks_unreferenced ON blocks(created) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS xattrs(
    bucket INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY(bucket, ino, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sync_marker(id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replies(
    client TEXT NOT NULL,
    request TEXT NOT NULL,
    reply BLOB NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY(client, request)
) WITHOUT ROWID;
";

const ATTR_COLS: &str = "ino, kind, mode, uid, gid, nlink, size, atime_s, atime_ns, mtime_s, mtime_ns, ctime_s, ctime_ns, rdev, version";

pub struct SqliteMeta {
    conn: Mutex<Connection>,
    /// When the open group of mutations began, if one is open.
    group_since: Mutex<Option<std::time::Instant>>,
}

impl SqliteMeta {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteMeta> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // Every statement is prepared once and reused: parsing SQL dominated small operations.
        conn.set_prepared_statement_cache_capacity(256);
        // ...and stays prepared: without the planner stability guarantee the
        // bundled SQLite (built with STAT4) re-prepares a statement whenever a
        // parameter compared with an indexed column changes value, which was
        // 12% of the server's CPU in a small-file create.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        // restfsd alone uses this database: exclusive locking spares a lock
        // syscall pair per statement.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Savepoints keep their undo pages here: in memory, not in a temp file.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // A page cache of 8 MiB (SQLite's default is 2 MiB). Not more: a
        // b-tree rebalance parks a page at the lock-byte page number, and the
        // commit after it then walks every cached page to drop those past the
        // end of the file. With 64 MiB that walk was 8% of restfsd's CPU in
        // small-file creates.
        conn.pragma_update(None, "cache_size", -8192)?;
        // Checkpoints (which fsync) run in `sync`, on the blocking pool, not
        // inside whichever commit happens to fill the WAL.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let tables: i64 = conn.prepare_cached("SELECT count(*) FROM sqlite_master WHERE type = 'table'")?.query_row([], |r| r.get(0))?;
        if tables > 0 && version != SCHEMA_VERSION {
            return Err(Error::Corrupt(format!(
                "{} has metadata schema version {version}; this restfsd needs {SCHEMA_VERSION}",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(SqliteMeta { conn: Mutex::new(conn), group_since: Mutex::new(None) })
    }

    /// Run `f` atomically in the open group of mutations (a savepoint,
    /// released if it succeeds and rolled back otherwise), and claim the
    /// sequence number of the changes it noted. The statements are cached
    /// (rusqlite's `Transaction` parses them on every call).
    fn with_tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.with_group(|conn| {
            conn.prepare_cached("SAVEPOINT op")?.execute([])?;
            let done = f(conn).and_then(|out| {
                // The changes this mutation noted carry seq + 1: claim that number.
                conn.prepare_cached("UPDATE buckets SET seq = seq + 1 WHERE EXISTS (SELECT 1 FROM changes c WHERE c.bucket = buckets.id AND c.seq = buckets.seq + 1)")?.execute([])?;
                conn.prepare_cached("RELEASE op")?.execute([])?;
                Ok(out)
            });
            if done.is_err() && !conn.is_autocommit() {
                let undone = conn.prepare_cached("ROLLBACK TO op").and_then(|mut s| s.execute([]));
                if let Err(e) = undone.and_then(|_| conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([]))) {
                    tracing::error!("rollback of a failed mutation failed: {e}");
                }
            }
            done
        })
    }

    /// Run `f` in the open group of mutations (beginning one if none is
    /// open), and commit the group once it is [`GROUP_WINDOW`] old. Alone,
    /// for one statement that notes no change: it is atomic by itself and
    /// claims no sequence number, so it needs no savepoint.
    fn with_group<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut since = self.group_since.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_autocommit() {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            *since = Some(std::time::Instant::now());
        }
        let done = f(&conn);
        if conn.is_autocommit() {
            // SQLite gave up the whole transaction (an I/O error): the group is lost.
            if since.take().is_some() {
                tracing::error!("a group of mutations was rolled back by SQLite");
            }
        } else if since.is_some_and(|t| t.elapsed() >= GROUP_WINDOW) {
            commit(&conn, &mut since)?;
        }
        done
    }

    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }
}

/// Commit the open group of mutations, if any.
fn commit(conn: &Connection, since: &mut Option<std::time::Instant>) -> Result<()> {
    if since.take().is_some() && !conn.is_autocommit() {
        conn.prepare_cached("COMMIT")?.execute([])?;
    }
    Ok(())
}

impl Drop for SqliteMeta {
    fn drop(&mut self) {
        if let Err(e) = self.commit_group() {
            tracing::error!("last group of mutations not committed: {e}");
        }
    }
}

fn kind_code(k: Kind) -> i64 {
    k.mode_bits() as i64
}

fn kind_of(code: i64) -> Result<Kind> {
    Kind::from_mode(code as u32).ok_or_else(|| Error::Corrupt(format!("unknown kind {code:o}")))
}

fn ts(row: &Row<'_>, i: usize) -> rusqlite::Result<Timespec> {
    Ok(Timespec { sec: row.get(i)?, nsec: row.get::<_, i64>(i + 1)? as u32 })
}

/// Decode the [`ATTR_COLS`] columns starting at `at`.
fn attr_at(row: &Row<'_>, at: usize) -> rusqlite::Result<(Attr, i64)> {
    let kind: i64 = row.get(at + 1)?;
    let attr = Attr {
        ino: row.get::<_, i64>(at)? as u64,
        kind: Kind::File, // replaced below; kind errors surface from `kind_of`
        mode: row.get::<_, i64>(at + 2)? as u32,
        uid: row.get::<_, i64>(at + 3)? as u32,
        gid: row.get::<_, i64>(at + 4)? as u32,
        nlink: row.get::<_, i64>(at + 5)? as u32,
        size: row.get::<_, i64>(at + 6)? as u64,
        atime: ts(row, at + 7)?,
        mtime: ts(row, at + 9)?,
        ctime: ts(row, at + 11)?,
        rdev: row.get::<_, i64>(at + 13)? as u32,
        version: row.get::<_, i64>(at + 14)? as u64,
    };
    Ok((attr, kind))
}

fn finish(pair: (Attr, i64)) -> Result<Attr> {
    let (mut attr, kind) = pair;
    attr.kind = kind_of(kind)?;
    Ok(attr)
}

fn load(tx: &Connection, b: BucketId, ino: Ino) -> Result<Attr> {
    let sql = format!("SELECT {ATTR_COLS} FROM inodes WHERE bucket = ?1 AND ino = ?2");
    let found = tx.prepare_cached(&sql)?.query_row(params![b, ino as i64], |r| attr_at(r, 0)).optional()?;
    match found {
        Some(pair) => finish(pair),
        None => Err(Error::fs(Errno::ENOENT, format!("inode {ino}"))),
    }
}

fn load_dir(tx: &Connection, b: BucketId, ino: Ino) -> Result<Attr> {
    let attr = load(tx, b, ino)?;
    if attr.kind != Kind::Dir {
        return Err(Error::fs(Errno::ENOTDIR, format!("inode {ino} is not a directory")));
    }
    Ok(attr)
}

const CHANGE_ATTR: i64 = 1;
const CHANGE_ENTRY: i64 = 2;

/// Log that inode `ino`'s attributes (or existence) changed.
fn note_attr(tx: &Connection, b: BucketId, ino: Ino) -> Result<()> {
    tx.prepare_cached("INSERT INTO changes(bucket, seq, kind, ino, name) SELECT ?1, seq + 1, ?2, ?3, NULL FROM buckets WHERE id = ?1")?
        .execute(params![b, CHANGE_ATTR, ino as i64])?;
    Ok(())
}

/// Log that entry `name` of directory `parent` changed.
fn note_entry(tx: &Connection, b: BucketId, parent: Ino, name: &[u8]) -> Result<()> {
    tx.prepare_cached("INSERT INTO changes(bucket, seq, kind, ino, name) SELECT ?1, seq + 1, ?2, ?3, ?4 FROM buckets WHERE id = ?1")?
        .execute(params![b, CHANGE_ENTRY, parent as i64, name])?;
    Ok(())
}

fn save(tx: &Connection, b: BucketId, a: &Attr) -> Result<()> {
    note_attr(tx, b, a.ino)?;
    tx.prepare_cached(
        "UPDATE inodes SET mode=?3, uid=?4, gid=?5, nlink=?6, size=?7, atime_s=?8, atime_ns=?9, mtime_s=?10, mtime_ns=?11,
         ctime_s=?12, ctime_ns=?13, rdev=?14, version=?15 WHERE bucket=?1 AND ino=?2",
    )?
    .execute(params![
        b,
        a.ino as i64,
        a.mode as i64,
        a.uid as i64,
        a.gid as i64,
        a.nlink as i64,
        a.size as i64,
        a.atime.sec,
        a.atime.nsec as i64,
        a.mtime.sec,
        a.mtime.nsec as i64,
        a.ctime.sec,
        a.ctime.nsec as i64,
        a.rdev as i64,
        a.version as i64
    ])?;
    Ok(())
}

fn child(tx: &Connection, b: BucketId, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
    let ino: Option<i64> = tx
        .prepare_cached("SELECT ino FROM dentries WHERE bucket=?1 AND parent=?2 AND name=?3")?
        .query_row(params![b, parent as i64, name], |r| r.get(0))
        .optional()?;
    Ok(ino.map(|i| i as u64))
}

fn parent_of(tx: &Connection, b: BucketId, dir: Ino) -> Result<Ino> {
    let p: i64 =
        tx.prepare_cached("SELECT parent FROM inodes WHERE bucket=?1 AND ino=?2")?.query_row(params![b, dir as i64], |r| r.get(0))?;
    Ok(p as u64)
}

fn is_empty_dir(tx: &Connection, b: BucketId, dir: Ino) -> Result<bool> {
    let any: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM dentries WHERE bucket=?1 AND parent=?2 LIMIT 1")?
        .query_row(params![b, dir as i64], |r| r.get(0))
        .optional()?;
    Ok(any.is_none())
}

/// Is `ino` the directory `ancestor` or inside it?
fn within(tx: &Connection, b: BucketId, mut ino: Ino, ancestor: Ino) -> Result<bool> {
    loop {
        if ino == ancestor {
            return Ok(true);
        }
        if ino == ROOT_INO {
            return Ok(false);
        }
        ino = parent_of(tx, b, ino)?;
    }
}

fn touch_dir(tx: &Connection, b: BucketId, dir: &mut Attr, now: Timespec) -> Result<()> {
    dir.mtime = now;
    dir.ctime = now;
    save(tx, b, dir)
}

fn add_entry(tx: &Connection, b: BucketId, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
    tx.prepare_cached("INSERT INTO dentries(bucket, parent, name, ino) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
        b,
        parent as i64,
        name,
        ino as i64
    ])?;
    note_entry(tx, b, parent, name)
}

fn remove_entry(tx: &Connection, b: BucketId, parent: Ino, name: &[u8]) -> Result<()> {
    tx.prepare_cached("DELETE FROM dentries WHERE bucket=?1 AND parent=?2 AND name=?3")?.execute(params![b, parent as i64, name])?;
    note_entry(tx, b, parent, name)
}

fn change_refs(tx: &Connection, hash: &[u8], delta: i64) -> Result<()> {
    tx.prepare_cached("UPDATE blocks SET refs = refs + ?2, created = ?3 WHERE hash = ?1")?.execute(params![
        hash,
        delta,
        Timespec::now().sec
    ])?;
    Ok(())
}

/// Delete block-map slots from index `from` on, dropping their references.
fn drop_slots_from(tx: &Connection, b: BucketId, ino: Ino, from: u64) -> Result<()> {
    tx.prepare_cached("UPDATE blocks SET refs = refs - (SELECT count(*) FROM blockmap m WHERE m.bucket=?1 AND m.ino=?2 AND m.idx>=?3 AND m.hash=blocks.hash),
                           created = ?4
         WHERE hash IN (SELECT hash FROM blockmap WHERE bucket=?1 AND ino=?2 AND idx>=?3)")?.execute(params![b, ino as i64, from as i64, Timespec::now().sec],)?;
    tx.prepare_cached("DELETE FROM blockmap WHERE bucket=?1 AND ino=?2 AND idx>=?3")?.execute(params![b, ino as i64, from as i64])?;
    Ok(())
}

/// Cut a file's block map to `size` bytes.
fn truncate_map(tx: &Connection, b: BucketId, ino: Ino, size: u64, block_size: u64) -> Result<()> {
    let keep = size.div_ceil(block_size);
    drop_slots_from(tx, b, ino, keep)?;
    trim_last_block(tx, b, ino, size, block_size)
}

/// The valid length of the block `size` ends in: at most what `size` leaves of it.
fn trim_last_block(tx: &Connection, b: BucketId, ino: Ino, size: u64, block_size: u64) -> Result<()> {
    if !size.is_multiple_of(block_size) {
        let last = size / block_size;
        let tail = (size % block_size) as i64;
        tx.prepare_cached("UPDATE blockmap SET len = min(len, ?4) WHERE bucket=?1 AND ino=?2 AND idx=?3")?.execute(params![
            b,
            ino as i64,
            last as i64,
            tail
        ])?;
    }
    Ok(())
}

fn delete_inode(tx: &Connection, b: BucketId, ino: Ino) -> Result<()> {
    drop_slots_from(tx, b, ino, 0)?;
    tx.prepare_cached("DELETE FROM xattrs WHERE bucket=?1 AND ino=?2")?.execute(params![b, ino as i64])?;
    tx.prepare_cached("DELETE FROM inodes WHERE bucket=?1 AND ino=?2")?.execute(params![b, ino as i64])?;
    note_attr(tx, b, ino)
}

/// Drop one link to a non-directory; delete it when the last goes, unless open.
fn drop_link(tx: &Connection, b: BucketId, mut attr: Attr, now: Timespec, is_open: IsOpen<'_>) -> Result<()> {
    attr.nlink = attr.nlink.saturating_sub(1);
    attr.ctime = now;
    if attr.nlink == 0 && !is_open(attr.ino) { delete_inode(tx, b, attr.ino) } else { save(tx, b, &attr) }
}

fn block_size_of(tx: &Connection, b: BucketId) -> Result<u64> {
    let bs: i64 = tx.prepare_cached("SELECT block_size FROM buckets WHERE id=?1")?.query_row(params![b], |r| r.get(0))?;
    Ok(bs as u64)
}

fn bucket_info(tx: &Connection, id: BucketId) -> Result<BucketInfo> {
    let (name, block_size, segment_blocks, s, ns): (String, i64, i64, i64, i64) = tx
        .prepare_cached("SELECT name, block_size, segment_blocks, created_s, created_ns FROM buckets WHERE id=?1")?
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
    let (objects, bytes): (i64, i64) = tx
        .prepare_cached("SELECT count(*), coalesce(sum(CASE WHEN kind = ?2 THEN size ELSE 0 END), 0) FROM inodes WHERE bucket=?1")?
        .query_row(params![id, kind_code(Kind::File)], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(BucketInfo {
        name,
        block_size: block_size as u32,
        segment_blocks: segment_blocks as u32,
        created: Timespec { sec: s, nsec: ns as u32 },
        objects: objects as u64,
        bytes: bytes as u64,
    })
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::fs(Errno::ERANGE, "xattr name length must be 1..=255"));
    }
    if name == acl::ACCESS || name == acl::DEFAULT {
        return Ok(());
    }
    const NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
    if !NAMESPACES.iter().any(|ns| name.starts_with(ns) && name.len() > ns.len()) {
        return Err(Error::fs(Errno::EOPNOTSUPP, "only user., trusted. and security. xattrs are stored"));
    }
    Ok(())
}

fn xattr(tx: &Connection, b: BucketId, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(tx
        .prepare_cached("SELECT value FROM xattrs WHERE bucket=?1 AND ino=?2 AND name=?3")?
        .query_row(params![b, ino as i64, name], |r| r.get(0))
        .optional()?)
}

fn put_xattr(tx: &Connection, b: BucketId, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
    tx.prepare_cached("INSERT OR REPLACE INTO xattrs(bucket, ino, name, value) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![b, ino as i64, name, value])?;
    Ok(())
}

/// Remove an xattr; whether there was one.
fn delete_xattr(tx: &Connection, b: BucketId, ino: Ino, name: &[u8]) -> Result<bool> {
    Ok(tx.prepare_cached("DELETE FROM xattrs WHERE bucket=?1 AND ino=?2 AND name=?3")?.execute(params![b, ino as i64, name])? > 0)
}

/// A stored ACL (see `restfs_proto::acl`).
fn stored_acl(tx: &Connection, b: BucketId, ino: Ino, name: &[u8]) -> Result<Option<acl::Acl>> {
    match xattr(tx, b, ino, name)? {
        None => Ok(None),
        Some(v) => acl::Acl::parse(&v).map(Some).ok_or_else(|| Error::Corrupt(format!("inode {ino} has a malformed ACL"))),
    }
}

fn resolve(t: SetTime, now: Timespec) -> Timespec {
    match t {
        SetTime::Now => now,
        SetTime::At(t) => t,
    }
}

impl MetaStore for SqliteMeta {
    fn create_bucket(&self, name: &str, block_size: u32, segment_blocks: u32) -> Result<BucketInfo> {
        self.with_tx(|tx| {
            let exists: Option<i64> =
                tx.prepare_cached("SELECT id FROM buckets WHERE name=?1")?.query_row(params![name], |r| r.get(0)).optional()?;
            if exists.is_some() {
                return Err(Error::fs(Errno::EEXIST, format!("bucket {name:?} exists")));
            }
            let now = super::stamp();
            tx.prepare_cached(
                "INSERT INTO buckets(name, block_size, segment_blocks, created_s, created_ns, next_ino) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                name,
                block_size as i64,
                segment_blocks as i64,
                now.sec,
                now.nsec as i64,
                (ROOT_INO + 1) as i64
            ])?;
            let id = tx.last_insert_rowid();
            tx.prepare_cached(&format!(
                "INSERT INTO inodes(bucket, {ATTR_COLS}, parent) VALUES (?1, ?2, ?3, ?4, 0, 0, 2, 0, ?5, ?6, ?5, ?6, ?5, ?6, 0, 0, ?2)"
            ))?
            .execute(params![id, ROOT_INO as i64, kind_code(Kind::Dir), 0o755, now.sec, now.nsec as i64])?;
            bucket_info(tx, id)
        })
    }

    fn list_buckets(&self) -> Result<Vec<BucketInfo>> {
        self.with_conn(|c| {
            let ids: Vec<i64> =
                c.prepare_cached("SELECT id FROM buckets ORDER BY name")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            ids.into_iter().map(|id| bucket_info(c, id)).collect()
        })
    }

    fn bucket(&self, name: &str) -> Result<(BucketId, BucketInfo)> {
        self.with_conn(|c| {
            let id: Option<i64> =
                c.prepare_cached("SELECT id FROM buckets WHERE name=?1")?.query_row(params![name], |r| r.get(0)).optional()?;
            let id = id.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no bucket {name:?}")))?;
            Ok((id, bucket_info(c, id)?))
        })
    }

    fn bucket_by_id(&self, b: BucketId) -> Result<BucketInfo> {
        self.with_conn(|c| bucket_info(c, b))
    }

    fn delete_bucket(&self, name: &str, force: bool) -> Result<()> {
        self.with_tx(|tx| {
            let id: Option<i64> =
                tx.prepare_cached("SELECT id FROM buckets WHERE name=?1")?.query_row(params![name], |r| r.get(0)).optional()?;
            let id = id.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no bucket {name:?}")))?;
            if !force && !is_empty_dir(tx, id, ROOT_INO)? {
                return Err(Error::fs(Errno::ENOTEMPTY, format!("bucket {name:?} is not empty")));
            }
            tx.prepare_cached(
                "UPDATE blocks SET refs = refs - (SELECT count(*) FROM blockmap m WHERE m.bucket=?1 AND m.hash=blocks.hash), created=?2
                 WHERE hash IN (SELECT hash FROM blockmap WHERE bucket=?1)",
            )?
            .execute(params![id, Timespec::now().sec])?;
            for table in ["blockmap", "xattrs", "dentries", "inodes", "changes"] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE bucket=?1"))?.execute(params![id])?;
            }
            tx.prepare_cached("DELETE FROM buckets WHERE id=?1")?.execute(params![id])?;
            Ok(())
        })
    }

    fn lookup(&self, b: BucketId, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        self.with_conn(|c| {
            let sql = format!(
                "SELECT {} FROM dentries d JOIN inodes i ON i.bucket = d.bucket AND i.ino = d.ino
                 WHERE d.bucket=?1 AND d.parent=?2 AND d.name=?3",
                ATTR_COLS.split(", ").map(|col| format!("i.{col}")).collect::<Vec<_>>().join(", ")
            );
            match c.prepare_cached(&sql)?.query_row(params![b, parent as i64, name], |r| attr_at(r, 0)).optional()? {
                Some(pair) => finish(pair),
                None => {
                    load_dir(c, b, parent)?;
                    Err(Error::fs(Errno::ENOENT, format!("no entry {:?}", Name(name.to_vec()))))
                }
            }
        })
    }

    fn getattr(&self, b: BucketId, ino: Ino) -> Result<Attr> {
        self.with_conn(|c| load(c, b, ino))
    }

    fn setattr(&self, b: BucketId, p: &SetAttrParams) -> Result<Attr> {
        self.with_tx(|tx| {
            let mut a = load(tx, b, p.ino)?;
            let now = super::stamp();
            if let Some(mode) = p.mode {
                a.mode = mode & 0o7777;
                if let Some(mut access) = stored_acl(tx, b, a.ino, acl::ACCESS)? {
                    access.chmod(a.mode);
                    put_xattr(tx, b, a.ino, acl::ACCESS, &access.to_bytes())?;
                }
            }
            if let Some(uid) = p.uid {
                a.uid = uid;
            }
            if let Some(gid) = p.gid {
                a.gid = gid;
            }
            if let Some(size) = p.size {
                match a.kind {
                    Kind::File => {}
                    Kind::Dir => {
                        return Err(Error::fs(Errno::EISDIR, "cannot truncate a directory"));
                    }
                    _ => return Err(Error::fs(Errno::EINVAL, "cannot truncate a special file")),
                }
                truncate_map(tx, b, a.ino, size, block_size_of(tx, b)?)?;
                a.size = size;
                a.version += 1;
                a.mtime = now;
            }
            if let Some(t) = p.atime {
                a.atime = resolve(t, now);
            }
            if let Some(t) = p.mtime {
                a.mtime = resolve(t, now);
            }
            a.ctime = now;
            save(tx, b, &a)?;
            Ok(a)
        })
    }

    fn reserve_inos(&self, b: BucketId, count: u64) -> Result<Ino> {
        self.with_tx(|tx| {
            let first: i64 = tx.prepare_cached("SELECT next_ino FROM buckets WHERE id=?1")?.query_row(params![b], |r| r.get(0))?;
            tx.prepare_cached("UPDATE buckets SET next_ino = next_ino + ?2 WHERE id=?1")?.execute(params![b, count as i64])?;
            Ok(first as u64)
        })
    }

    fn mknod(&self, b: BucketId, p: &NewNodeParams, target: Option<&[u8]>) -> Result<Attr> {
        check_name(p.name.as_bytes())?;
        self.with_tx(|tx| {
            let mut dir = load_dir(tx, b, p.parent)?;
            if dir.nlink == 0 {
                return Err(Error::fs(Errno::ENOENT, "directory was removed"));
            }
            if child(tx, b, p.parent, p.name.as_bytes())?.is_some() {
                return Err(Error::fs(Errno::EEXIST, format!("{:?} exists", p.name)));
            }
            let next: i64 = tx.prepare_cached("SELECT next_ino FROM buckets WHERE id=?1")?.query_row(params![b], |r| r.get(0))?;
            let ino = match p.ino {
                None => {
                    tx.prepare_cached("UPDATE buckets SET next_ino = next_ino + 1 WHERE id=?1")?.execute(params![b])?;
                    next
                }
                Some(ino) if ino > restfs_proto::ROOT_INO && (ino as i64) < next && load(tx, b, ino).is_err() => ino as i64,
                Some(ino) => return Err(Error::fs(Errno::EINVAL, format!("inode number {ino} is not reserved or is in use"))),
            };
            let now = super::stamp();
            // A default ACL on the directory stands in for the umask.
            let default = if p.kind == Kind::Symlink { None } else { stored_acl(tx, b, p.parent, acl::DEFAULT)? };
            let (access, mut mode) = match &default {
                Some(d) => d.inherit(p.mode & 0o7777),
                None => (None, p.mode & 0o7777 & !p.umask),
            };
            let mut gid = p.gid;
            // BSD group semantics in a setgid directory; subdirectories inherit the bit.
            if dir.mode & libc::S_ISGID != 0 {
                gid = dir.gid;
                if p.kind == Kind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            let (nlink, size) = match p.kind {
                Kind::Dir => (2, 0),
                Kind::Symlink => (1, target.map_or(0, |t| t.len() as u64)),
                _ => (1, 0),
            };
            let rdev = if matches!(p.kind, Kind::CharDev | Kind::BlockDev) { p.rdev } else { 0 };
            tx.prepare_cached(&format!("INSERT INTO inodes(bucket, {ATTR_COLS}, parent, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?9, ?10, ?9, ?10, ?11, 0, ?12, ?13)"))?.execute(params![b, ino, kind_code(p.kind), mode as i64, p.uid as i64, gid as i64, nlink, size as i64, now.sec, now.nsec as i64, rdev as i64, p.parent as i64, target],)?;
            note_attr(tx, b, ino as u64)?;
            if let Some(access) = access {
                put_xattr(tx, b, ino as u64, acl::ACCESS, &access.to_bytes())?;
            }
            if let (Some(d), Kind::Dir) = (&default, p.kind) {
                put_xattr(tx, b, ino as u64, acl::DEFAULT, &d.to_bytes())?;
            }
            add_entry(tx, b, p.parent, p.name.as_bytes(), ino as u64)?;
            if p.kind == Kind::Dir {
                dir.nlink += 1;
            }
            touch_dir(tx, b, &mut dir, now)?;
            load(tx, b, ino as u64)
        })
    }

    fn readlink(&self, b: BucketId, ino: Ino) -> Result<Vec<u8>> {
        self.with_conn(|c| {
            let a = load(c, b, ino)?;
            if a.kind != Kind::Symlink {
                return Err(Error::fs(Errno::EINVAL, "not a symlink"));
            }
            let t: Option<Vec<u8>> = c
                .prepare_cached("SELECT target FROM inodes WHERE bucket=?1 AND ino=?2")?
                .query_row(params![b, ino as i64], |r| r.get(0))?;
            t.ok_or_else(|| Error::Corrupt(format!("symlink {ino} has no target")))
        })
    }

    fn link(&self, b: BucketId, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        self.with_tx(|tx| {
            let mut a = load(tx, b, ino)?;
            if a.kind == Kind::Dir {
                return Err(Error::fs(Errno::EPERM, "cannot hard-link a directory"));
            }
            if a.nlink == 0 {
                return Err(Error::fs(Errno::ENOENT, "cannot link an unlinked file"));
            }
            if a.nlink >= LINK_MAX {
                return Err(Error::fs(Errno::EMLINK, "too many links"));
            }
            let mut dir = load_dir(tx, b, parent)?;
            if child(tx, b, parent, name)?.is_some() {
                return Err(Error::fs(Errno::EEXIST, format!("{:?} exists", Name(name.to_vec()))));
            }
            let now = super::stamp();
            add_entry(tx, b, parent, name, ino)?;
            a.nlink += 1;
            a.ctime = now;
            save(tx, b, &a)?;
            touch_dir(tx, b, &mut dir, now)?;
            Ok(a)
        })
    }

    fn unlink(&self, b: BucketId, parent: Ino, name: &[u8], is_open: IsOpen<'_>) -> Result<()> {
        check_name(name)?;
        self.with_tx(|tx| {
            let mut dir = load_dir(tx, b, parent)?;
            let ino = child(tx, b, parent, name)?.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no entry {:?}", Name(name.to_vec()))))?;
            let a = load(tx, b, ino)?;
            if a.kind == Kind::Dir {
                return Err(Error::fs(Errno::EISDIR, "unlink of a directory"));
            }
            let now = super::stamp();
            remove_entry(tx, b, parent, name)?;
            drop_link(tx, b, a, now, is_open)?;
            touch_dir(tx, b, &mut dir, now)
        })
    }

    fn rmdir(&self, b: BucketId, parent: Ino, name: &[u8]) -> Result<()> {
        check_name(name)?;
        self.with_tx(|tx| {
            let mut dir = load_dir(tx, b, parent)?;
            let ino = child(tx, b, parent, name)?.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no entry {:?}", Name(name.to_vec()))))?;
            let a = load(tx, b, ino)?;
            if a.kind != Kind::Dir {
                return Err(Error::fs(Errno::ENOTDIR, "rmdir of a non-directory"));
            }
            if !is_empty_dir(tx, b, ino)? {
                return Err(Error::fs(Errno::ENOTEMPTY, "directory not empty"));
            }
            let now = super::stamp();
            remove_entry(tx, b, parent, name)?;
            delete_inode(tx, b, ino)?;
            dir.nlink -= 1;
            touch_dir(tx, b, &mut dir, now)
        })
    }

    fn rename(&self, b: BucketId, p: &RenameParams, is_open: IsOpen<'_>) -> Result<()> {
        check_name(p.name.as_bytes())?;
        check_name(p.new_name.as_bytes())?;
        if p.noreplace && p.exchange {
            return Err(Error::fs(Errno::EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE together"));
        }
        self.with_tx(|tx| {
            let (name, new_name) = (p.name.as_bytes(), p.new_name.as_bytes());
            load_dir(tx, b, p.parent)?;
            load_dir(tx, b, p.new_parent)?;
            let src_ino = child(tx, b, p.parent, name)?.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no entry {:?}", p.name)))?;
            let mut src = load(tx, b, src_ino)?;
            let dst_ino = child(tx, b, p.new_parent, new_name)?;
            let now = super::stamp();

            if p.exchange {
                let dst_ino = dst_ino.ok_or_else(|| Error::fs(Errno::ENOENT, format!("no entry {:?}", p.new_name)))?;
                if dst_ino == src_ino {
                    return Ok(());
                }
                let mut dst = load(tx, b, dst_ino)?;
                if (src.kind == Kind::Dir && within(tx, b, p.new_parent, src_ino)?)
                    || (dst.kind == Kind::Dir && within(tx, b, p.parent, dst_ino)?)
                {
                    return Err(Error::fs(Errno::EINVAL, "would move a directory into itself"));
                }
                tx.prepare_cached("UPDATE dentries SET ino=?4 WHERE bucket=?1 AND parent=?2 AND name=?3")?.execute(params![
                    b,
                    p.parent as i64,
                    name,
                    dst_ino as i64
                ])?;
                tx.prepare_cached("UPDATE dentries SET ino=?4 WHERE bucket=?1 AND parent=?2 AND name=?3")?.execute(params![
                    b,
                    p.new_parent as i64,
                    new_name,
                    src_ino as i64
                ])?;
                note_entry(tx, b, p.parent, name)?;
                note_entry(tx, b, p.new_parent, new_name)?;
                for (node, to) in [(&mut src, p.new_parent), (&mut dst, p.parent)] {
                    node.ctime = now;
                    save(tx, b, node)?;
                    if node.kind == Kind::Dir {
                        tx.prepare_cached("UPDATE inodes SET parent=?3 WHERE bucket=?1 AND ino=?2")?.execute(params![
                            b,
                            node.ino as i64,
                            to as i64
                        ])?;
                    }
                }
                let delta = (src.kind == Kind::Dir) as i64 - (dst.kind == Kind::Dir) as i64;
                let mut old_dir = load(tx, b, p.parent)?;
                old_dir.nlink = (old_dir.nlink as i64 - delta) as u32;
                touch_dir(tx, b, &mut old_dir, now)?;
                let mut new_dir = load(tx, b, p.new_parent)?;
                new_dir.nlink = (new_dir.nlink as i64 + delta) as u32;
                return touch_dir(tx, b, &mut new_dir, now);
            }

            if p.noreplace && dst_ino.is_some() {
                return Err(Error::fs(Errno::EEXIST, format!("{:?} exists", p.new_name)));
            }
            if dst_ino == Some(src_ino) {
                return Ok(()); // two links to one inode: POSIX says do nothing
            }
            if src.kind == Kind::Dir && within(tx, b, p.new_parent, src_ino)? {
                return Err(Error::fs(Errno::EINVAL, "would move a directory into itself"));
            }
            let mut replaced_dir = false;
            if let Some(dst_ino) = dst_ino {
                let dst = load(tx, b, dst_ino)?;
                match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                    (true, false) => {
                        return Err(Error::fs(Errno::ENOTDIR, "cannot replace a non-directory with a directory"));
                    }
                    (false, true) => {
                        return Err(Error::fs(Errno::EISDIR, "cannot replace a directory with a non-directory"));
                    }
                    (true, true) => {
                        if !is_empty_dir(tx, b, dst_ino)? {
                            return Err(Error::fs(Errno::ENOTEMPTY, "target directory not empty"));
                        }
                        delete_inode(tx, b, dst_ino)?;
                        replaced_dir = true;
                    }
                    (false, false) => drop_link(tx, b, dst, now, is_open)?,
                }
                remove_entry(tx, b, p.new_parent, new_name)?;
            }
            remove_entry(tx, b, p.parent, name)?;
            add_entry(tx, b, p.new_parent, new_name, src_ino)?;
            src.ctime = now;
            save(tx, b, &src)?;
            let moved_dir = src.kind == Kind::Dir && p.parent != p.new_parent;
            if src.kind == Kind::Dir {
                tx.prepare_cached("UPDATE inodes SET parent=?3 WHERE bucket=?1 AND ino=?2")?.execute(params![
                    b,
                    src_ino as i64,
                    p.new_parent as i64
                ])?;
            }
            let mut old_dir = load(tx, b, p.parent)?;
            if moved_dir {
                old_dir.nlink -= 1;
            }
            if replaced_dir && !moved_dir {
                old_dir.nlink -= 1; // same parent: the replaced subdirectory is gone
            }
            touch_dir(tx, b, &mut old_dir, now)?;
            if p.new_parent != p.parent {
                let mut new_dir = load(tx, b, p.new_parent)?;
                // +1 for the arriving directory, -1 for a replaced one.
                new_dir.nlink = new_dir.nlink + moved_dir as u32 - replaced_dir as u32;
                touch_dir(tx, b, &mut new_dir, now)?;
            }
            Ok(())
        })
    }

    fn readdir(&self, b: BucketId, ino: Ino, after: Option<&[u8]>, limit: u32) -> Result<Listing> {
        self.with_conn(|c| {
            load_dir(c, b, ino)?;
            let parent = parent_of(c, b, ino)?;
            let sql = format!(
                "SELECT d.name, {} FROM dentries d JOIN inodes i ON i.bucket = d.bucket AND i.ino = d.ino
                 WHERE d.bucket=?1 AND d.parent=?2 AND d.name > ?3 ORDER BY d.name LIMIT ?4",
                ATTR_COLS.split(", ").map(|col| format!("i.{col}")).collect::<Vec<_>>().join(", ")
            );
            let limit = limit.clamp(1, 10_000);
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![b, ino as i64, after.unwrap_or(b""), limit as i64 + 1], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, attr_at(r, 1)?))
            })?;
            let mut entries = Vec::new();
            for row in rows {
                let (name, pair) = row?;
                entries.push(DirEntry { name: Name(name), attr: finish(pair)? });
            }
            let more = entries.len() > limit as usize;
            entries.truncate(limit as usize);
            Ok(Listing { parent, entries, more })
        })
    }

    fn purge(&self, b: BucketId, ino: Ino, is_open: IsOpen<'_>) -> Result<bool> {
        self.with_tx(|tx| match load(tx, b, ino) {
            Ok(a) if a.nlink == 0 && !is_open(ino) => delete_inode(tx, b, ino).map(|_| true),
            Ok(_) | Err(Error::Fs(Errno::ENOENT, _)) => Ok(false),
            Err(e) => Err(e),
        })
    }

    fn orphans(&self) -> Result<Vec<(BucketId, Ino)>> {
        self.with_tx(|tx| {
            let orphans: Vec<(i64, i64)> = tx
                .prepare_cached("SELECT bucket, ino FROM inodes WHERE nlink = 0")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(orphans.into_iter().map(|(b, ino)| (b, ino as Ino)).collect())
        })
    }

    fn setxattr(&self, b: BucketId, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(Error::fs(Errno(libc::E2BIG), "xattr value too large"));
        }
        self.with_tx(|tx| {
            let mut a = load(tx, b, ino)?;
            let exists: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM xattrs WHERE bucket=?1 AND ino=?2 AND name=?3")?
                .query_row(params![b, ino as i64, name], |r| r.get(0))
                .optional()?;
            match (mode, exists.is_some()) {
                (XattrMode::Create, true) => return Err(Error::fs(Errno::EEXIST, "xattr exists")),
                (XattrMode::Replace, false) => {
                    return Err(Error::fs(Errno::ENODATA, "no such xattr"));
                }
                _ => {}
            }
            if name == acl::ACCESS || name == acl::DEFAULT {
                let parsed = acl::Acl::parse(value).ok_or_else(|| Error::fs(Errno::EINVAL, "malformed ACL"))?;
                if name == acl::DEFAULT && a.kind != Kind::Dir {
                    return Err(Error::fs(Errno::EACCES, "only directories have default ACLs"));
                }
                // An access ACL is the mode's permission bits, and no more
                // than them when it is minimal.
                if name == acl::ACCESS {
                    a.mode = parsed.mode(a.mode);
                    if parsed.is_minimal() {
                        delete_xattr(tx, b, ino, name)?;
                        a.ctime = super::stamp();
                        return save(tx, b, &a);
                    }
                }
            }
            put_xattr(tx, b, ino, name, value)?;
            a.ctime = super::stamp();
            save(tx, b, &a)
        })
    }

    fn getxattr(&self, b: BucketId, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.with_conn(|c| {
            load(c, b, ino)?;
            let v: Option<Vec<u8>> = c
                .prepare_cached("SELECT value FROM xattrs WHERE bucket=?1 AND ino=?2 AND name=?3")?
                .query_row(params![b, ino as i64, name], |r| r.get(0))
                .optional()?;
            v.ok_or_else(|| Error::fs(Errno::ENODATA, "no such xattr"))
        })
    }

    fn listxattr(&self, b: BucketId, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.with_conn(|c| {
            load(c, b, ino)?;
            let names = c
                .prepare_cached("SELECT name FROM xattrs WHERE bucket=?1 AND ino=?2 ORDER BY name")?
                .query_map(params![b, ino as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(names)
        })
    }

    fn removexattr(&self, b: BucketId, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        self.with_tx(|tx| {
            let mut a = load(tx, b, ino)?;
            if !delete_xattr(tx, b, ino, name)? {
                return Err(Error::fs(Errno::ENODATA, "no such xattr"));
            }
            a.ctime = super::stamp();
            save(tx, b, &a)
        })
    }

    fn block_map(&self, b: BucketId, ino: Ino, first: u64, count: u64) -> Result<(u64, Vec<BlockRef>)> {
        self.with_conn(|c| {
            let a = load(c, b, ino)?;
            let mut stmt =
                c.prepare_cached("SELECT idx, hash, len FROM blockmap WHERE bucket=?1 AND ino=?2 AND idx>=?3 AND idx<?4 ORDER BY idx")?;
            // Indices are stored as i64: clamp so a huge window cannot wrap negative.
            let (start, end) = (first.min(i64::MAX as u64) as i64, first.saturating_add(count).min(i64::MAX as u64) as i64);
            let rows = stmt.query_map(params![b, ino as i64, start, end], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut refs = Vec::new();
            for row in rows {
                let (idx, hash, len) = row?;
                let hash: [u8; 32] = hash.try_into().map_err(|_| Error::Corrupt("hash length".into()))?;
                refs.push(BlockRef { index: idx as u64, hash: Hash(hash), len: len as u32 });
            }
            Ok((a.version, refs))
        })
    }

    fn commit(&self, b: BucketId, ino: Ino, size: u64, slots: &[BlockSlot], mtime: Option<Timespec>) -> Result<Attr> {
        self.with_tx(|tx| {
            let mut a = load(tx, b, ino)?;
            if a.kind != Kind::File {
                return Err(Error::fs(if a.kind == Kind::Dir { Errno::EISDIR } else { Errno::EINVAL }, "not a regular file"));
            }
            let bs = block_size_of(tx, b)?;
            for slot in slots {
                if slot.index.saturating_mul(bs) >= size && slot.block.is_some() {
                    return Err(Error::fs(Errno::EINVAL, format!("block {} lies past the size {size}", slot.index)));
                }
                let old: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT hash FROM blockmap WHERE bucket=?1 AND ino=?2 AND idx=?3")?
                    .query_row(params![b, ino as i64, slot.index as i64], |r| r.get(0))
                    .optional()?;
                if let Some((hash, len)) = slot.block {
                    let block_len: Option<i64> = tx
                        .prepare_cached("SELECT size FROM blocks WHERE hash=?1")?
                        .query_row(params![&hash.0[..]], |r| r.get(0))
                        .optional()?;
                    let block_len = block_len.ok_or_else(|| Error::fs(Errno::EAGAIN, format!("block {hash} is not on the server")))?;
                    if len as i64 > block_len || len as u64 > bs {
                        return Err(Error::fs(
                            Errno::EINVAL,
                            format!("slot {} claims {len} bytes of a {block_len}-byte block", slot.index),
                        ));
                    }
                    change_refs(tx, &hash.0, 1)?;
                    tx.prepare_cached("INSERT OR REPLACE INTO blockmap(bucket, ino, idx, hash, len) VALUES (?1, ?2, ?3, ?4, ?5)")?
                        .execute(params![b, ino as i64, slot.index as i64, &hash.0[..], len as i64])?;
                } else {
                    tx.prepare_cached("DELETE FROM blockmap WHERE bucket=?1 AND ino=?2 AND idx=?3")?.execute(params![
                        b,
                        ino as i64,
                        slot.index as i64
                    ])?;
                }
                if let Some(old) = old {
                    change_refs(tx, &old, -1)?;
                }
            }
            if size < a.size {
                truncate_map(tx, b, ino, size, bs)?;
            } else {
                // Nothing lies past the old size: only the last block may be
                // claimed longer than the file.
                trim_last_block(tx, b, ino, size, bs)?;
            }
            let now = super::stamp();
            a.size = size;
            a.version += 1;
            a.mtime = mtime.unwrap_or(now);
            a.ctime = now.max(a.mtime);
            save(tx, b, &a)?;
            Ok(a)
        })
    }

    fn has_blocks(&self, hashes: &[Hash]) -> Result<Vec<bool>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM blocks WHERE hash=?1")?;
            hashes.iter().map(|h| Ok(stmt.query_row(params![&h.0[..]], |_| Ok(())).optional()?.is_some())).collect()
        })
    }

    fn add_block(&self, hash: &Hash, size: u32, inline: Option<&[u8]>) -> Result<()> {
        self.with_group(|tx| {
            tx.prepare_cached(
                "INSERT INTO blocks(hash, size, refs, created, data) VALUES (?1, ?2, 0, ?3, ?4)
                 ON CONFLICT(hash) DO UPDATE SET created = excluded.created",
            )?
            .execute(params![&hash.0[..], size as i64, Timespec::now().sec, inline])?;
            Ok(())
        })
    }

    fn block_location(&self, hash: &Hash) -> Result<BlockLocation> {
        self.with_conn(|c| {
            let found: Option<Option<Vec<u8>>> =
                c.prepare_cached("SELECT data FROM blocks WHERE hash=?1")?.query_row(params![&hash.0[..]], |r| r.get(0)).optional()?;
            match found {
                None => Err(Error::fs(Errno::ENOENT, format!("no block {hash}"))),
                Some(Some(data)) => Ok(BlockLocation::Inline(data)),
                Some(None) => Ok(BlockLocation::External),
            }
        })
    }

    fn collect_garbage(&self, min_age_secs: u64) -> Result<Garbage> {
        self.with_tx(|tx| {
            let cutoff = Timespec::now().sec - min_age_secs as i64;
            let rows: Vec<(Vec<u8>, i64, bool)> = tx
                .prepare_cached("SELECT hash, size, data IS NULL FROM blocks WHERE refs <= 0 AND created <= ?1")?
                .query_map(params![cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut g = Garbage::default();
            for (hash, size, external) in rows {
                tx.prepare_cached("DELETE FROM blocks WHERE hash=?1")?.execute(params![&hash])?;
                g.blocks += 1;
                g.bytes += size as u64;
                if external {
                    let h: [u8; 32] = hash.try_into().map_err(|_| Error::Corrupt("hash length".into()))?;
                    g.external.push(Hash(h));
                }
            }
            Ok(g)
        })
    }

    fn changes_since(&self, b: BucketId, since: u64, limit: u64) -> Result<ChangeLog> {
        self.with_conn(|c| {
            let (seq, log_start): (i64, i64) = c
                .prepare_cached("SELECT seq, log_start FROM buckets WHERE id=?1")?
                .query_row(params![b], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| Error::fs(Errno::ENOENT, "bucket is gone"))?;
            let (seq, log_start) = (seq as u64, log_start as u64);
            let through = seq.min(since.saturating_add(limit.max(1)));
            let mut stmt =
                c.prepare_cached("SELECT seq, kind, ino, name FROM changes WHERE bucket=?1 AND seq>?2 AND seq<=?3 ORDER BY seq")?;
            let rows = stmt.query_map(params![b, since.min(i64::MAX as u64) as i64, through as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<Vec<u8>>>(3)?))
            })?;
            let mut changes = Vec::new();
            for row in rows {
                let (seq, kind, ino, name) = row?;
                let what = match (kind, name) {
                    (CHANGE_ENTRY, Some(name)) => Changed::Entry(ino as u64, name),
                    _ => Changed::Attr(ino as u64),
                };
                changes.push((seq as u64, what));
            }
            Ok(ChangeLog { seq, log_start, through: through.max(since.min(seq)), changes })
        })
    }

    fn trim_changes(&self, keep: u64) -> Result<()> {
        self.with_tx(|tx| {
            let keep = keep.min(i64::MAX as u64) as i64;
            tx.prepare_cached("DELETE FROM changes WHERE seq <= (SELECT b.seq FROM buckets b WHERE b.id = changes.bucket) - ?1")?
                .execute(params![keep])?;
            tx.prepare_cached("UPDATE buckets SET log_start = max(log_start, seq - ?1)")?.execute(params![keep])?;
            Ok(())
        })
    }

    fn remember_reply(&self, client: &str, request: &str, reply: &[u8]) -> Result<()> {
        self.with_conn(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO replies(client, request, reply, at) VALUES (?1, ?2, ?3, ?4)")?.execute(params![
                client,
                request,
                reply,
                Timespec::now().sec
            ])?;
            Ok(())
        })
    }

    fn reply(&self, client: &str, request: &str) -> Result<Option<Vec<u8>>> {
        self.with_conn(|c| {
            Ok(c.prepare_cached("SELECT reply FROM replies WHERE client=?1 AND request=?2")?
                .query_row(params![client, request], |r| r.get(0))
                .optional()?)
        })
    }

    fn forget_replies(&self, client: &str, requests: &[String]) -> Result<()> {
        self.with_conn(|c| {
            let mut forget = c.prepare_cached("DELETE FROM replies WHERE client = ?1 AND request = ?2")?;
            for request in requests {
                forget.execute(params![client, request])?;
            }
            Ok(())
        })
    }

    fn trim_replies(&self, secs: u64, lasting: &str, lasting_secs: u64) -> Result<()> {
        let before = |secs: u64| Timespec::now().sec - secs.min(i64::MAX as u64) as i64;
        self.with_conn(|c| {
            c.prepare_cached("DELETE FROM replies WHERE at < ?1 AND client != ?2")?.execute(params![before(secs), lasting])?;
            c.prepare_cached("DELETE FROM replies WHERE at < ?1 AND client = ?2")?.execute(params![before(lasting_secs), lasting])?;
            Ok(())
        })
    }

    fn commit_group(&self) -> Result<bool> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut since = self.group_since.lock().unwrap_or_else(|p| p.into_inner());
        let open = since.is_some();
        commit(&conn, &mut since)?;
        Ok(open)
    }

    fn sync(&self) -> Result<()> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        commit(&conn, &mut self.group_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let marked =
            conn.prepare_cached("INSERT INTO sync_marker(id, n) VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1")?.execute([]);
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        marked?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}
