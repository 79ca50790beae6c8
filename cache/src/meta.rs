//! The persistent metadata cache (SQLite): attributes, directory entries
//! (negative ones included), complete directory listings, block maps, and
//! the last change sequence number applied.
//!
//! Rules that keep it correct:
//! - Attributes, from pushes and replies alike, are merged newest-wins
//!   (data version and ctime only grow), so arrival order does not matter.
//! - Server pushes remove the entries they name; they never insert one.
//! - Entries and listings from a reply are cached only if no push arrived
//!   while it was in flight (the caller, which owns the link, checks), so a
//!   late reply can never overwrite a newer invalidation.
//! - Block maps are keyed by the file's data version: an old map is never
//!   used for new content, so they need no invalidation.
//! - The cache belongs to one bucket; a different bucket identity, or a
//!   change log that no longer reaches back, wipes it.

use restfs_proto::{Attr, BlockRef, Ino};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA: &str = "
PRAGMA locking_mode = EXCLUSIVE;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attrs(ino INTEGER PRIMARY KEY, attr TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER, PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS listed(dir INTEGER PRIMARY KEY, parent INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blockmaps(ino INTEGER NOT NULL, seg INTEGER NOT NULL, version INTEGER NOT NULL, refs TEXT NOT NULL, PRIMARY KEY(ino, seg)) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
pub enum MetaCacheError {
    #[error("metadata cache: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metadata cache: {0}")]
    Encoding(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, MetaCacheError>;

/// A cached lookup result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The name exists and its attributes are cached.
    Found(Attr),
    /// The name is known not to exist.
    Missing,
}

pub struct MetaCache {
    conn: Mutex<Connection>,
}

impl MetaCache {
    /// Open the cache at `path` for bucket `identity` (wiped if it held another).
    pub fn open(path: &Path, identity: &str) -> Result<MetaCache> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        let cache = MetaCache { conn: Mutex::new(conn) };
        let held: Option<String> = cache.get_state("identity")?;
        if held.as_deref() != Some(identity) {
            cache.wipe()?;
            cache.set_state("identity", identity)?;
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_state(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().query_row("SELECT value FROM state WHERE key=?1", params![key], |r| r.get(0)).optional()?)
    }

    fn set_state(&self, key: &str, value: &str) -> Result<()> {
        self.lock().execute("INSERT OR REPLACE INTO state(key, value) VALUES (?1, ?2)", params![key, value])?;
        Ok(())
    }

    /// Forget everything but the bucket identity.
    pub fn wipe(&self) -> Result<()> {
        self.lock().execute_batch(
            "DELETE FROM attrs; DELETE FROM entries; DELETE FROM listed; DELETE FROM blockmaps; DELETE FROM state WHERE key = 'seq';",
        )?;
        Ok(())
    }

    /// The last change sequence number applied.
    pub fn applied_seq(&self) -> Result<Option<u64>> {
        Ok(self.get_state("seq")?.and_then(|s| s.parse().ok()))
    }

    pub fn set_applied_seq(&self, seq: u64) -> Result<()> {
        self.set_state("seq", &seq.to_string())
    }

    // --- reads ---

    pub fn attr(&self, ino: Ino) -> Result<Option<Attr>> {
        let text: Option<String> =
            self.lock().prepare_cached("SELECT attr FROM attrs WHERE ino=?1")?.query_row(params![ino as i64], |r| r.get(0)).optional()?;
        Ok(match text {
            Some(t) => Some(serde_json::from_str(&t)?),
            None => None,
        })
    }

    pub fn entry(&self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        let found: Option<Option<i64>> = self
            .lock()
            .prepare_cached("SELECT ino FROM entries WHERE parent=?1 AND name=?2")?
            .query_row(params![parent as i64, name], |r| r.get(0))
            .optional()?;
        match found {
            None => Ok(None),
            Some(None) => Ok(Some(Entry::Missing)),
            Some(Some(ino)) => Ok(self.attr(ino as u64)?.map(Entry::Found)),
        }
    }

    /// A complete listing of `dir`: (its parent, entries with attributes),
    /// if cached whole and every entry's attributes are cached.
    pub fn listing(&self, dir: Ino) -> Result<Option<(Ino, Vec<(Vec<u8>, Attr)>)>> {
        let conn = self.lock();
        let parent: Option<i64> =
            conn.prepare_cached("SELECT parent FROM listed WHERE dir=?1")?.query_row(params![dir as i64], |r| r.get(0)).optional()?;
        let Some(parent) = parent else { return Ok(None) };
        let mut stmt = conn.prepare_cached(
            "SELECT e.name, a.attr FROM entries e LEFT JOIN attrs a ON a.ino = e.ino WHERE e.parent=?1 AND e.ino IS NOT NULL ORDER BY e.name",
        )?;
        let rows = stmt.query_map(params![dir as i64], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<String>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, attr) = row?;
            let Some(attr) = attr else { return Ok(None) };
            out.push((name, serde_json::from_str(&attr)?));
        }
        Ok(Some((parent as u64, out)))
    }

    /// A segment's block map at `version`, if cached.
    pub fn block_map(&self, ino: Ino, seg: u64, version: u64) -> Result<Option<Vec<BlockRef>>> {
        let text: Option<String> = self
            .lock()
            .prepare_cached("SELECT refs FROM blockmaps WHERE ino=?1 AND seg=?2 AND version=?3")?
            .query_row(params![ino as i64, seg as i64, version as i64], |r| r.get(0))
            .optional()?;
        Ok(match text {
            Some(t) => Some(serde_json::from_str(&t)?),
            None => None,
        })
    }

    // --- fills (callers first check that no push crossed the reply) ---

    pub fn put_attr(&self, attr: &Attr) -> Result<()> {
        let text = serde_json::to_string(attr)?;
        self.lock().prepare_cached("INSERT OR REPLACE INTO attrs(ino, attr) VALUES (?1, ?2)")?.execute(params![attr.ino as i64, text])?;
        Ok(())
    }

    pub fn put_entry(&self, parent: Ino, name: &[u8], attr: Option<&Attr>) -> Result<()> {
        if let Some(a) = attr {
            self.merge_attr(a.ino, Some(a))?;
        }
        self.lock().prepare_cached("INSERT OR REPLACE INTO entries(parent, name, ino) VALUES (?1, ?2, ?3)")?.execute(params![
            parent as i64,
            name,
            attr.map(|a| a.ino as i64)
        ])?;
        Ok(())
    }

    /// Cache a whole listing of `dir`.
    pub fn put_listing(&self, dir: Ino, parent: Ino, entries: &[(Vec<u8>, Attr)]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM entries WHERE parent=?1 AND ino IS NOT NULL", params![dir as i64])?;
        for (name, attr) in entries {
            // Newest wins, as in `merge_attr`.
            let cached: Option<String> =
                tx.query_row("SELECT attr FROM attrs WHERE ino=?1", params![attr.ino as i64], |r| r.get(0)).optional()?;
            let newer = match cached {
                Some(text) => {
                    let c: Attr = serde_json::from_str(&text)?;
                    (c.version, c.ctime) > (attr.version, attr.ctime)
                }
                None => false,
            };
            if !newer {
                tx.execute(
                    "INSERT OR REPLACE INTO attrs(ino, attr) VALUES (?1, ?2)",
                    params![attr.ino as i64, serde_json::to_string(attr)?],
                )?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO entries(parent, name, ino) VALUES (?1, ?2, ?3)",
                params![dir as i64, name, attr.ino as i64],
            )?;
        }
        tx.execute("INSERT OR REPLACE INTO listed(dir, parent) VALUES (?1, ?2)", params![dir as i64, parent as i64])?;
        tx.commit()?;
        Ok(())
    }

    pub fn put_block_map(&self, ino: Ino, seg: u64, version: u64, refs: &[BlockRef]) -> Result<()> {
        let text = serde_json::to_string(refs)?;
        self.lock()
            .prepare_cached("INSERT OR REPLACE INTO blockmaps(ino, seg, version, refs) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![ino as i64, seg as i64, version as i64, text])?;
        Ok(())
    }

    // --- invalidations ---

    /// Merge attributes learnt from a push or a reply: they replace the
    /// cached ones unless those are newer (by data version, then ctime, both
    /// of which only grow), so arrival order does not matter. `None` (the
    /// inode is gone) forgets them. Returns whether the cache already held
    /// exactly this state.
    pub fn merge_attr(&self, ino: Ino, now: Option<&Attr>) -> Result<bool> {
        let Some(now) = now else {
            self.forget_attr(ino)?;
            return Ok(false);
        };
        match self.attr(ino)? {
            Some(cached) if cached == *now => Ok(true),
            Some(cached) if (cached.version, cached.ctime) > (now.version, now.ctime) => Ok(false),
            _ => self.put_attr(now).map(|_| false),
        }
    }

    /// Apply a pushed entry change: keep the cached entry if it already
    /// names `now` (`None`: known missing). Returns whether it was kept.
    pub fn forget_entry_unless(&self, parent: Ino, name: &[u8], now: Option<Ino>) -> Result<bool> {
        let cached: Option<Option<i64>> = self
            .lock()
            .prepare_cached("SELECT ino FROM entries WHERE parent=?1 AND name=?2")?
            .query_row(params![parent as i64, name], |r| r.get(0))
            .optional()?;
        if cached.is_some_and(|c| c.map(|i| i as u64) == now) {
            return Ok(true);
        }
        self.forget_entry(parent, name).map(|_| false)
    }

    /// Forget an inode's attributes.
    pub fn forget_attr(&self, ino: Ino) -> Result<()> {
        self.lock().prepare_cached("DELETE FROM attrs WHERE ino=?1")?.execute(params![ino as i64])?;
        Ok(())
    }

    /// Forget entry `name` of `parent`, the attributes of what it named, and
    /// the completeness of the parent's listing.
    pub fn forget_entry(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let conn = self.lock();
        let named: Option<Option<i64>> = conn
            .prepare_cached("SELECT ino FROM entries WHERE parent=?1 AND name=?2")?
            .query_row(params![parent as i64, name], |r| r.get(0))
            .optional()?;
        if let Some(Some(ino)) = named {
            conn.prepare_cached("DELETE FROM attrs WHERE ino=?1")?.execute(params![ino])?;
        }
        conn.prepare_cached("DELETE FROM entries WHERE parent=?1 AND name=?2")?.execute(params![parent as i64, name])?;
        conn.prepare_cached("DELETE FROM listed WHERE dir=?1")?.execute(params![parent as i64])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restfs_proto::{Hash, Kind, Timespec};

    fn attr(ino: Ino, version: u64) -> Attr {
        let t = Timespec { sec: 1, nsec: 0 };
        Attr { ino, kind: Kind::File, mode: 0o644, uid: 0, gid: 0, nlink: 1, size: 10, atime: t, mtime: t, ctime: t, rdev: 0, version }
    }

    #[test]
    fn entries_attrs_listings_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let c = MetaCache::open(&dir.path().join("meta.db"), "bucket-a").unwrap();
        c.put_entry(1, b"f", Some(&attr(5, 1))).unwrap();
        c.put_entry(1, b"nope", None).unwrap();
        assert_eq!(c.entry(1, b"f").unwrap(), Some(Entry::Found(attr(5, 1))));
        assert_eq!(c.entry(1, b"nope").unwrap(), Some(Entry::Missing));
        assert_eq!(c.entry(1, b"other").unwrap(), None);
        c.put_listing(1, 1, &[(b"f".to_vec(), attr(5, 1)), (b"g".to_vec(), attr(6, 1))]).unwrap();
        assert_eq!(c.listing(1).unwrap().unwrap().1.len(), 2);
        c.forget_entry(1, b"g").unwrap();
        assert_eq!(c.listing(1).unwrap(), None, "a changed directory is no longer complete");
        assert_eq!(c.entry(1, b"g").unwrap(), None);
        c.forget_attr(5).unwrap();
        assert_eq!(c.entry(1, b"f").unwrap(), None, "an entry without attributes is a miss");
    }

    #[test]
    fn block_maps_are_per_version_and_state_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let c = MetaCache::open(&path, "bucket-a").unwrap();
            let refs = vec![BlockRef { index: 0, hash: Hash::of(b"x"), len: 1 }];
            c.put_block_map(5, 0, 3, &refs).unwrap();
            assert_eq!(c.block_map(5, 0, 3).unwrap(), Some(refs));
            assert_eq!(c.block_map(5, 0, 4).unwrap(), None);
            c.set_applied_seq(42).unwrap();
            c.put_attr(&attr(5, 3)).unwrap();
        }
        let c = MetaCache::open(&path, "bucket-a").unwrap();
        assert_eq!(c.applied_seq().unwrap(), Some(42));
        assert!(c.attr(5).unwrap().is_some());
        drop(c); // one connection at a time: the cache locks its database
        let c = MetaCache::open(&path, "bucket-b").unwrap();
        assert_eq!(c.applied_seq().unwrap(), None, "another bucket starts empty");
        assert!(c.attr(5).unwrap().is_none());
    }
}
