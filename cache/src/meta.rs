//! The persistent metadata cache: attributes, directory entries (negative
//! ones included), complete directory listings, block maps, and the last
//! change sequence number applied.
//!
//! Attributes, entries and listings live in memory, so lookups, getattr and
//! readdir cost no I/O; everything is written behind to SQLite. A flusher
//! thread commits the journal of changes in one transaction every
//! [`FLUSH_INTERVAL`] (and on [`MetaCache::persist`]). Each commit holds a
//! prefix of the history, the applied sequence number included, so a crash
//! leaves an older but consistent cache, which the next mount brings up to
//! date from the server's change log. Block maps, which can be large, stay
//! in SQLite only (plus the ones not yet written).
//!
//! Rules that keep it correct:
//! - Attributes, from pushes and replies alike, are merged newest-wins
//!   (data version and ctime only grow), so arrival order does not matter.
//! - Pushes, applied in order, set the entries they name.
//! - Entries and listings from a reply are cached only if no push that
//!   contradicts them arrived while it was in flight (the caller, which owns
//!   the link, checks), so a late reply never overwrites newer news.
//! - A listed directory's entries are complete: a name it lacks is missing.
//! - Block maps are keyed by the file's data version: an old map is never
//!   used for new content, so they need no invalidation.
//! - The cache belongs to one bucket; a different bucket identity, or a
//!   change log that no longer reaches back, wipes it.

use restfs_proto::methods::Change;
use restfs_proto::{Attr, BlockRef, Ino};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often the journal of changes is written to disk.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Bumped when the tables change; a cache of another version is dropped.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attrs(ino INTEGER PRIMARY KEY, attr TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER, PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS listed(dir INTEGER PRIMARY KEY, parent INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blockmaps(ino INTEGER NOT NULL, seg INTEGER NOT NULL, version INTEGER NOT NULL, refs TEXT NOT NULL, PRIMARY KEY(ino, seg)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unacked(ino INTEGER PRIMARY KEY, record TEXT NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum MetaCacheError {
    #[error("metadata cache: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metadata cache: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("metadata cache: {0}")]
    Io(#[from] std::io::Error),
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

/// One change to write behind, in the order it was made.
enum Op {
    Attr(Ino, Option<Attr>),
    /// `None`: forget the entry; `Some(None)`: known missing.
    Entry(Ino, Vec<u8>, Option<Option<Ino>>),
    /// Drop a directory's positive entries (before a fresh listing).
    ClearEntries(Ino),
    Listed(Ino, Option<Ino>),
    Map(Ino, u64, u64, Vec<BlockRef>),
    Unacked(Ino, Option<String>),
    Seq(u64),
    Wipe,
}

#[derive(Default)]
struct State {
    attrs: HashMap<Ino, Attr>,
    /// Entries per directory, by name; `None` is a negative entry.
    entries: HashMap<Ino, BTreeMap<Vec<u8>, Option<Ino>>>,
    /// Directories whose listing is complete, with their parent.
    listed: HashMap<Ino, Ino>,
    /// Block maps not yet written: (ino, segment) → (version, refs).
    maps: HashMap<(Ino, u64), (u64, Vec<BlockRef>)>,
    /// Commits sent but not acknowledged, by inode (kept across wipes).
    unacked: HashMap<Ino, String>,
    seq: Option<u64>,
    journal: Vec<Op>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    conn: Mutex<Connection>,
}

/// A directory's entries with their attributes, by name.
pub type Listing = Vec<(Vec<u8>, Attr)>;

pub struct MetaCache {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MetaCache {
    /// Open the cache at `path` for bucket `identity` (wiped if it held
    /// another, or was written by another schema version).
    pub fn open(path: &Path, identity: &str) -> Result<MetaCache> {
        let conn = Connection::open(path)?;
        // Statements stay prepared whatever values are bound (see restfsd's store).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            conn.execute_batch(
                "DROP TABLE IF EXISTS state; DROP TABLE IF EXISTS attrs; DROP TABLE IF EXISTS entries;
                 DROP TABLE IF EXISTS listed; DROP TABLE IF EXISTS blockmaps; DROP TABLE IF EXISTS unacked;",
            )?;
            conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))?;
        }
        conn.execute_batch(SCHEMA)?;
        let held: Option<String> = conn.query_row("SELECT value FROM state WHERE key='identity'", [], |r| r.get(0)).optional()?;
        if held.as_deref() != Some(identity) {
            conn.execute_batch(
                "DELETE FROM attrs; DELETE FROM entries; DELETE FROM listed; DELETE FROM blockmaps; DELETE FROM unacked; DELETE FROM state;",
            )?;
            conn.execute("INSERT INTO state(key, value) VALUES ('identity', ?1)", params![identity])?;
        }
        let state = load(&conn)?;
        let shared = Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new(), conn: Mutex::new(conn) });
        let worker = shared.clone();
        let flusher = std::thread::Builder::new().name("restfs-metacache".into()).spawn(move || flush_loop(&worker))?;
        Ok(MetaCache { shared, flusher: Some(flusher) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        locked(&self.shared.state)
    }

    /// Write everything changed so far to disk now.
    pub fn persist(&self) -> Result<()> {
        write_journal(&self.shared)
    }

    /// Forget everything but the bucket identity and unacknowledged commits.
    pub fn wipe(&self) -> Result<()> {
        let mut st = self.state();
        let journal = std::mem::take(&mut st.journal);
        let unacked = std::mem::take(&mut st.unacked);
        *st = State { journal, unacked, ..State::default() };
        st.journal.push(Op::Wipe);
        Ok(())
    }

    /// The last change sequence number applied.
    pub fn applied_seq(&self) -> Result<Option<u64>> {
        Ok(self.state().seq)
    }

    pub fn set_applied_seq(&self, seq: u64) -> Result<()> {
        let mut st = self.state();
        st.seq = Some(seq);
        st.journal.push(Op::Seq(seq));
        Ok(())
    }

    // --- reads ---

    pub fn attr(&self, ino: Ino) -> Result<Option<Attr>> {
        Ok(self.state().attrs.get(&ino).cloned())
    }

    /// What `name` in `parent` is, if known: cached as found or missing, or
    /// absent from a complete listing.
    pub fn entry(&self, parent: Ino, name: &[u8]) -> Result<Option<Entry>> {
        let st = self.state();
        Ok(match st.entries.get(&parent).and_then(|e| e.get(name)) {
            Some(Some(ino)) => st.attrs.get(ino).cloned().map(Entry::Found),
            Some(None) => Some(Entry::Missing),
            None => st.listed.contains_key(&parent).then_some(Entry::Missing),
        })
    }

    /// What entry `name` of `parent` names, attributes cached or not:
    /// `Some(Some(ino))`, `Some(None)` when known missing, `None` if unknown.
    pub fn entry_ino(&self, parent: Ino, name: &[u8]) -> Result<Option<Option<Ino>>> {
        let st = self.state();
        Ok(match st.entries.get(&parent).and_then(|e| e.get(name)) {
            Some(v) => Some(*v),
            None => st.listed.contains_key(&parent).then_some(None),
        })
    }

    /// A complete listing of `dir`: (its parent, entries with attributes,
    /// by name), if cached whole and every entry's attributes are cached.
    pub fn listing(&self, dir: Ino) -> Result<Option<(Ino, Listing)>> {
        let st = self.state();
        let Some(parent) = st.listed.get(&dir) else { return Ok(None) };
        let mut out = Vec::new();
        for (name, ino) in st.entries.get(&dir).into_iter().flatten() {
            let Some(ino) = ino else { continue };
            let Some(attr) = st.attrs.get(ino) else { return Ok(None) };
            out.push((name.clone(), attr.clone()));
        }
        Ok(Some((*parent, out)))
    }

    /// A segment's block map at `version`, if cached.
    pub fn block_map(&self, ino: Ino, seg: u64, version: u64) -> Result<Option<Vec<BlockRef>>> {
        if let Some((v, refs)) = self.state().maps.get(&(ino, seg)) {
            return Ok((*v == version).then(|| refs.clone()));
        }
        let text: Option<String> = locked(&self.shared.conn)
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
        self.state().put_attr(attr.clone());
        Ok(())
    }

    /// Cache what `name` in `parent` is: found with `attr`, or missing.
    pub fn put_entry(&self, parent: Ino, name: &[u8], attr: Option<&Attr>) -> Result<()> {
        let mut st = self.state();
        if let Some(a) = attr {
            st.merge_attr(a);
        }
        st.put_entry(parent, name, Some(attr.map(|a| a.ino)));
        Ok(())
    }

    /// Cache a whole listing of `dir` (entries by name; their attributes
    /// are merged newest-wins).
    pub fn put_listing(&self, dir: Ino, parent: Ino, entries: &[(Vec<u8>, Attr)]) -> Result<()> {
        let mut st = self.state();
        if let Some(names) = st.entries.get_mut(&dir) {
            names.retain(|_, ino| ino.is_none());
        }
        st.journal.push(Op::ClearEntries(dir));
        for (name, attr) in entries {
            st.merge_attr(attr);
            st.put_entry(dir, name, Some(Some(attr.ino)));
        }
        st.listed.insert(dir, parent);
        st.journal.push(Op::Listed(dir, Some(parent)));
        Ok(())
    }

    pub fn put_block_map(&self, ino: Ino, seg: u64, version: u64, refs: &[BlockRef]) -> Result<()> {
        let mut st = self.state();
        st.maps.insert((ino, seg), (version, refs.to_vec()));
        st.journal.push(Op::Map(ino, seg, version, refs.to_vec()));
        Ok(())
    }

    // --- commits not yet acknowledged (a journal, not a cache) ---

    /// Record the commit of `ino` in flight (replacing an older one).
    pub fn put_unacked(&self, ino: Ino, record: &str) -> Result<()> {
        let mut st = self.state();
        st.unacked.insert(ino, record.to_owned());
        st.journal.push(Op::Unacked(ino, Some(record.to_owned())));
        Ok(())
    }

    pub fn clear_unacked(&self, ino: Ino) -> Result<()> {
        let mut st = self.state();
        if st.unacked.remove(&ino).is_some() {
            st.journal.push(Op::Unacked(ino, None));
        }
        Ok(())
    }

    /// Forget the commit of `ino` in flight if it is still `record` (not
    /// replaced by a later one).
    pub fn clear_unacked_if(&self, ino: Ino, record: &str) -> Result<()> {
        let mut st = self.state();
        if st.unacked.get(&ino).is_some_and(|r| r == record) {
            st.unacked.remove(&ino);
            st.journal.push(Op::Unacked(ino, None));
        }
        Ok(())
    }

    /// Every commit in flight when the cache was last written.
    pub fn unacked(&self) -> Result<Vec<(Ino, String)>> {
        Ok(self.state().unacked.iter().map(|(i, r)| (*i, r.clone())).collect())
    }

    // --- this client's own namespace changes (no push crossed the reply) ---

    /// A name this client just removed: it is now missing, and what it
    /// named has changed (its attributes come back with the server's push).
    /// A complete listing of `parent` stays complete.
    pub fn remove_entry(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let mut st = self.state();
        if let Some(Some(ino)) = st.entries.get(&parent).and_then(|e| e.get(name)).copied() {
            st.forget_attr(ino);
        }
        st.put_entry(parent, name, Some(None));
        Ok(())
    }

    /// A rename this client just made: the new name names what the old one
    /// did, whose attributes (and those of anything replaced) come back with
    /// the server's pushes; complete listings stay complete. Without a
    /// cached entry for the old name (unless the push of this rename came
    /// first), both names are forgotten instead.
    pub fn rename_entry(&self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> Result<()> {
        let mut st = self.state();
        let moved = st.entries.get(&new_parent).and_then(|e| e.get(new_name)).copied().flatten();
        let ino = match (st.entries.get(&parent).and_then(|e| e.get(name)).copied(), moved) {
            (Some(Some(ino)), _) => ino,
            // The push of this very rename was applied first: only a moved
            // directory's `..` is left to update.
            (Some(None), Some(moved)) => {
                if let Some(p) = st.listed.get_mut(&moved) {
                    *p = new_parent;
                    st.journal.push(Op::Listed(moved, Some(new_parent)));
                }
                return Ok(());
            }
            _ => {
                st.forget_entry(parent, name);
                st.forget_entry(new_parent, new_name);
                return Ok(());
            }
        };
        if let Some(Some(replaced)) = st.entries.get(&new_parent).and_then(|e| e.get(new_name)).copied() {
            st.forget_attr(replaced);
        }
        st.forget_attr(ino);
        if let Some(p) = st.listed.get_mut(&ino) {
            *p = new_parent;
            st.journal.push(Op::Listed(ino, Some(new_parent)));
        }
        st.put_entry(parent, name, Some(None));
        st.put_entry(new_parent, new_name, Some(Some(ino)));
        Ok(())
    }

    // --- pushes and invalidations ---

    /// Merge attributes learnt from a push or a reply: they replace the
    /// cached ones unless those are newer (by data version, then ctime, both
    /// of which only grow), so arrival order does not matter. `None` (the
    /// inode is gone) forgets them. Returns whether the cache already held
    /// this state or a newer one.
    pub fn merge_attr(&self, ino: Ino, now: Option<&Attr>) -> Result<bool> {
        Ok(self.state().merge_pushed_attr(ino, now))
    }

    /// Apply a pushed entry change: `name` in `parent` now names `now`
    /// (`None`: nothing). Complete listings stay complete. Returns whether
    /// the cache already knew.
    pub fn apply_entry(&self, parent: Ino, name: &[u8], now: Option<Ino>) -> Result<bool> {
        Ok(self.state().apply_entry(parent, name, now))
    }

    /// Apply a push's changes at once (no other call sees half of them,
    /// e.g. a rename's old name gone but its new one not there yet).
    /// Returns, per change, whether the cache already knew it.
    pub fn apply_changes(&self, changes: &[Change]) -> Result<Vec<bool>> {
        let mut st = self.state();
        Ok(changes
            .iter()
            .map(|change| match change {
                Change::Attr { ino, attr, .. } => st.merge_pushed_attr(*ino, attr.as_ref()),
                Change::Entry { parent, name, ino, .. } => st.apply_entry(*parent, name.as_bytes(), *ino),
            })
            .collect())
    }

    /// Forget an inode's attributes.
    pub fn forget_attr(&self, ino: Ino) -> Result<()> {
        self.state().forget_attr(ino);
        Ok(())
    }

    /// Forget entry `name` of `parent`, the attributes of what it named, and
    /// the completeness of the parent's listing.
    pub fn forget_entry(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.state().forget_entry(parent, name);
        Ok(())
    }
}

impl State {
    fn merge_pushed_attr(&mut self, ino: Ino, now: Option<&Attr>) -> bool {
        match now {
            None => {
                self.forget_attr(ino);
                false
            }
            Some(now) => self.merge_attr(now),
        }
    }

    fn apply_entry(&mut self, parent: Ino, name: &[u8], now: Option<Ino>) -> bool {
        let cached = self.entries.get(&parent).and_then(|e| e.get(name)).copied();
        let known = match cached {
            Some(c) => c == now,
            None => now.is_none() && self.listed.contains_key(&parent),
        };
        if !known {
            if let Some(Some(old)) = cached {
                // A directory that moved away: its listing's `..` may be stale.
                self.forget_listed(old);
            }
            self.put_entry(parent, name, Some(now));
        }
        known
    }

    fn put_attr(&mut self, attr: Attr) {
        self.journal.push(Op::Attr(attr.ino, Some(attr.clone())));
        self.attrs.insert(attr.ino, attr);
    }

    /// Newest wins; returns whether the cache already held `now` or newer
    /// (news to nobody: this client learnt it first from its own replies).
    fn merge_attr(&mut self, now: &Attr) -> bool {
        match self.attrs.get(&now.ino) {
            Some(cached) if cached == now => true,
            Some(cached) if (cached.version, cached.ctime) > (now.version, now.ctime) => true,
            _ => {
                self.put_attr(now.clone());
                false
            }
        }
    }

    fn forget_attr(&mut self, ino: Ino) {
        if self.attrs.remove(&ino).is_some() {
            self.journal.push(Op::Attr(ino, None));
        }
    }

    fn put_entry(&mut self, parent: Ino, name: &[u8], value: Option<Option<Ino>>) {
        let names = self.entries.entry(parent).or_default();
        match value {
            Some(v) => {
                names.insert(name.to_vec(), v);
            }
            None => {
                names.remove(name);
            }
        }
        self.journal.push(Op::Entry(parent, name.to_vec(), value));
    }

    fn forget_entry(&mut self, parent: Ino, name: &[u8]) {
        if let Some(Some(ino)) = self.entries.get(&parent).and_then(|e| e.get(name)).copied() {
            self.forget_attr(ino);
            // A directory that moved: its listing's `..` may be stale.
            self.forget_listed(ino);
        }
        self.put_entry(parent, name, None);
        self.forget_listed(parent);
    }

    fn forget_listed(&mut self, dir: Ino) {
        if self.listed.remove(&dir).is_some() {
            self.journal.push(Op::Listed(dir, None));
        }
    }
}

/// Read the persisted cache into memory.
fn load(conn: &Connection) -> Result<State> {
    let mut st = State::default();
    let mut stmt = conn.prepare("SELECT attr FROM attrs")?;
    for text in stmt.query_map([], |r| r.get::<_, String>(0))? {
        let attr: Attr = serde_json::from_str(&text?)?;
        st.attrs.insert(attr.ino, attr);
    }
    let mut stmt = conn.prepare("SELECT parent, name, ino FROM entries")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Option<i64>>(2)?)))? {
        let (parent, name, ino) = row?;
        st.entries.entry(parent as Ino).or_default().insert(name, ino.map(|i| i as Ino));
    }
    let mut stmt = conn.prepare("SELECT dir, parent FROM listed")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
        let (dir, parent) = row?;
        st.listed.insert(dir as Ino, parent as Ino);
    }
    let mut stmt = conn.prepare("SELECT ino, record FROM unacked")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
        let (ino, record) = row?;
        st.unacked.insert(ino as Ino, record);
    }
    st.seq =
        conn.query_row("SELECT value FROM state WHERE key='seq'", [], |r| r.get::<_, String>(0)).optional()?.and_then(|s| s.parse().ok());
    Ok(st)
}

fn flush_loop(shared: &Shared) {
    loop {
        let closed = {
            let st = locked(&shared.state);
            let (st, _) = shared.wake.wait_timeout_while(st, FLUSH_INTERVAL, |st| !st.closed).unwrap_or_else(|p| p.into_inner());
            st.closed
        };
        if let Err(e) = write_journal(shared) {
            tracing::warn!("{e}");
        }
        if closed {
            return;
        }
    }
}

/// Commit the journal in one transaction. The connection lock is taken
/// before the journal, so concurrent writers keep the journal's order.
fn write_journal(shared: &Shared) -> Result<()> {
    let mut conn = locked(&shared.conn);
    let journal = std::mem::take(&mut locked(&shared.state).journal);
    if journal.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for op in &journal {
        match op {
            Op::Attr(ino, Some(a)) => {
                tx.prepare_cached("INSERT OR REPLACE INTO attrs(ino, attr) VALUES (?1, ?2)")?
                    .execute(params![*ino as i64, serde_json::to_string(a)?])?;
            }
            Op::Attr(ino, None) => {
                tx.prepare_cached("DELETE FROM attrs WHERE ino=?1")?.execute(params![*ino as i64])?;
            }
            Op::Entry(parent, name, Some(ino)) => {
                tx.prepare_cached("INSERT OR REPLACE INTO entries(parent, name, ino) VALUES (?1, ?2, ?3)")?.execute(params![
                    *parent as i64,
                    name,
                    ino.map(|i| i as i64)
                ])?;
            }
            Op::Entry(parent, name, None) => {
                tx.prepare_cached("DELETE FROM entries WHERE parent=?1 AND name=?2")?.execute(params![*parent as i64, name])?;
            }
            Op::ClearEntries(dir) => {
                tx.prepare_cached("DELETE FROM entries WHERE parent=?1 AND ino IS NOT NULL")?.execute(params![*dir as i64])?;
            }
            Op::Listed(dir, Some(parent)) => {
                tx.prepare_cached("INSERT OR REPLACE INTO listed(dir, parent) VALUES (?1, ?2)")?
                    .execute(params![*dir as i64, *parent as i64])?;
            }
            Op::Listed(dir, None) => {
                tx.prepare_cached("DELETE FROM listed WHERE dir=?1")?.execute(params![*dir as i64])?;
            }
            Op::Map(ino, seg, version, refs) => {
                tx.prepare_cached("INSERT OR REPLACE INTO blockmaps(ino, seg, version, refs) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![*ino as i64, *seg as i64, *version as i64, serde_json::to_string(refs)?])?;
            }
            Op::Unacked(ino, Some(record)) => {
                tx.prepare_cached("INSERT OR REPLACE INTO unacked(ino, record) VALUES (?1, ?2)")?.execute(params![*ino as i64, record])?;
            }
            Op::Unacked(ino, None) => {
                tx.prepare_cached("DELETE FROM unacked WHERE ino=?1")?.execute(params![*ino as i64])?;
            }
            Op::Seq(seq) => {
                tx.prepare_cached("INSERT OR REPLACE INTO state(key, value) VALUES ('seq', ?1)")?.execute(params![seq.to_string()])?;
            }
            Op::Wipe => {
                tx.execute_batch(
                    "DELETE FROM attrs; DELETE FROM entries; DELETE FROM listed; DELETE FROM blockmaps; DELETE FROM state WHERE key = 'seq';",
                )?;
            }
        }
    }
    tx.commit()?;
    // Written maps are served from SQLite from now on.
    let mut st = locked(&shared.state);
    for op in &journal {
        if let Op::Map(ino, seg, version, _) = op
            && st.maps.get(&(*ino, *seg)).is_some_and(|(v, _)| v == version)
        {
            st.maps.remove(&(*ino, *seg));
        }
    }
    Ok(())
}

impl Drop for MetaCache {
    fn drop(&mut self) {
        self.state().closed = true;
        self.shared.wake.notify_all();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
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
        assert_eq!(c.entry(1, b"other").unwrap(), Some(Entry::Missing), "a complete listing knows what is missing");
        c.forget_entry(1, b"g").unwrap();
        assert_eq!(c.listing(1).unwrap(), None, "a forgotten entry makes the listing incomplete");
        assert_eq!(c.entry(1, b"g").unwrap(), None);
        assert_eq!(c.entry(1, b"other").unwrap(), None);
        c.forget_attr(5).unwrap();
        assert_eq!(c.entry(1, b"f").unwrap(), None, "an entry without attributes is a miss");
    }

    #[test]
    fn changes_keep_a_listing_complete() {
        let dir = tempfile::tempdir().unwrap();
        let c = MetaCache::open(&dir.path().join("meta.db"), "bucket-a").unwrap();
        c.put_listing(2, 1, &[]).unwrap();
        c.put_entry(2, b"new", Some(&attr(7, 0))).unwrap();
        assert_eq!(c.listing(2).unwrap().unwrap().1, vec![(b"new".to_vec(), attr(7, 0))]);
        c.remove_entry(2, b"new").unwrap();
        assert_eq!(c.entry(2, b"new").unwrap(), Some(Entry::Missing));
        assert_eq!(c.attr(7).unwrap(), None, "what a removed name named has changed");
        assert_eq!(c.listing(2).unwrap().unwrap().1, vec![]);
        // The server's push confirming the removal is known.
        assert!(c.apply_entry(2, b"new", None).unwrap());
        // Another client's create, learnt from a push, joins the listing
        // once its attributes (pushed with it) are merged.
        assert!(!c.apply_entry(2, b"theirs", Some(9)).unwrap());
        assert_eq!(c.listing(2).unwrap(), None);
        c.merge_attr(9, Some(&attr(9, 0))).unwrap();
        assert_eq!(c.listing(2).unwrap().unwrap().1, vec![(b"theirs".to_vec(), attr(9, 0))]);
        assert!(!c.apply_entry(2, b"theirs", None).unwrap());
        assert_eq!(c.entry(2, b"theirs").unwrap(), Some(Entry::Missing));
        // A rename keeps both listings complete once the pushed attributes are back.
        c.put_listing(3, 1, &[(b"a".to_vec(), attr(8, 0))]).unwrap();
        c.put_listing(4, 1, &[]).unwrap();
        c.rename_entry(3, b"a", 4, b"b").unwrap();
        assert_eq!(c.entry(3, b"a").unwrap(), Some(Entry::Missing));
        assert_eq!(c.listing(4).unwrap(), None, "the renamed inode's attributes are awaited");
        c.merge_attr(8, Some(&attr(8, 0))).unwrap();
        assert_eq!(c.listing(4).unwrap().unwrap().1, vec![(b"b".to_vec(), attr(8, 0))]);
        assert_eq!(c.listing(3).unwrap().unwrap().1, vec![]);
    }

    #[test]
    fn block_maps_are_per_version_and_state_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let refs = vec![BlockRef { index: 0, hash: Hash::of(b"x"), len: 1 }];
        {
            let c = MetaCache::open(&path, "bucket-a").unwrap();
            c.put_block_map(5, 0, 3, &refs).unwrap();
            assert_eq!(c.block_map(5, 0, 3).unwrap(), Some(refs.clone()), "served before it is written");
            c.persist().unwrap();
            assert_eq!(c.block_map(5, 0, 3).unwrap(), Some(refs.clone()), "and after");
            assert_eq!(c.block_map(5, 0, 4).unwrap(), None);
            c.set_applied_seq(42).unwrap();
            c.put_attr(&attr(5, 3)).unwrap();
            c.put_listing(1, 1, &[(b"f".to_vec(), attr(5, 3))]).unwrap();
        }
        let c = MetaCache::open(&path, "bucket-a").unwrap();
        assert_eq!(c.applied_seq().unwrap(), Some(42));
        assert!(c.attr(5).unwrap().is_some());
        assert_eq!(c.listing(1).unwrap().unwrap().1.len(), 1);
        assert_eq!(c.block_map(5, 0, 3).unwrap(), Some(refs));
        drop(c); // one connection at a time: the cache locks its database
        let c = MetaCache::open(&path, "bucket-b").unwrap();
        assert_eq!(c.applied_seq().unwrap(), None, "another bucket starts empty");
        assert!(c.attr(5).unwrap().is_none());
        assert_eq!(c.listing(1).unwrap(), None);
    }

    #[test]
    fn a_wipe_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let c = MetaCache::open(&path, "bucket-a").unwrap();
            c.put_attr(&attr(5, 3)).unwrap();
            c.persist().unwrap();
            c.wipe().unwrap();
            c.put_attr(&attr(6, 1)).unwrap();
        }
        let c = MetaCache::open(&path, "bucket-a").unwrap();
        assert!(c.attr(5).unwrap().is_none());
        assert!(c.attr(6).unwrap().is_some());
    }

    #[test]
    fn unacknowledged_commits_outlive_wipes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let c = MetaCache::open(&path, "bucket-a").unwrap();
            c.put_unacked(5, "five").unwrap();
            c.put_unacked(6, "six").unwrap();
            c.clear_unacked(6).unwrap();
            c.wipe().unwrap();
        }
        let c = MetaCache::open(&path, "bucket-a").unwrap();
        assert_eq!(c.unacked().unwrap(), vec![(5, "five".to_string())]);
        drop(c);
        let c = MetaCache::open(&path, "bucket-b").unwrap();
        assert!(c.unacked().unwrap().is_empty(), "another bucket's journal is not ours");
    }
}
