//! The service: the stores plus what spans connections (open files,
//! durability timer, garbage collection).
//!
//! Invariants kept here:
//! - a block is registered only after the block store holds it durably and
//!   its hash was verified, so a commit can never name a missing block;
//! - an unlinked inode stays while any connection holds it open and is
//!   purged at its last release;
//! - mutations are committed in groups (within the store's group window),
//!   become durable within [`SYNC_INTERVAL`], or at once on `fs.sync`.

use crate::blocks::{BlockStore, INLINE_MAX};
use crate::error::{Error, Result};
use crate::meta::{BlockLocation, BucketId, MetaStore};
use restfs_proto::{Errno, Hash, Ino, MAX_BLOCK_SIZE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest time a committed but not fsync'd mutation waits to be durable.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Unreferenced blocks younger than this survive garbage collection: a
/// client may have put them and be about to commit.
pub const GC_MIN_AGE_SECS: u64 = 600;

/// How often the server collects garbage on its own.
pub const GC_INTERVAL: Duration = Duration::from_secs(600);

/// Sequence numbers of change log kept per bucket. A client reconnecting
/// from further back is told to revalidate everything.
pub const CHANGE_LOG_KEEP: u64 = 100_000;

pub use restfs_proto::REPLAY_KEEP_SECS;

/// How long the outcome of a batch stays in the replay cache unless its
/// holder says it has it (`BatchParams::forget`): long enough for a mount
/// that crashed with a batch in flight to come back and send it again.
pub const BATCH_REPLY_KEEP_SECS: u64 = 30 * 24 * 3600;

/// The replay cache's "client" for batches named by a token.
pub const BATCH_REPLIES: &str = "fs.batch";

tokio::task_local! {
    /// Inside [`Service::deferring_bumps`]: the bucket to wake once the reply is on its way.
    static DEFERRED_BUMP: std::cell::Cell<Option<BucketId>>;
}

pub struct Service {
    meta: Arc<dyn MetaStore>,
    blocks: Arc<dyn BlockStore>,
    /// Open counts per inode, over all connections.
    opens: Mutex<HashMap<(BucketId, Ino), u32>>,
    /// Something was committed since the last sync.
    dirty: AtomicBool,
    /// Held shared by puts, exclusively by GC, so GC never deletes a block
    /// a concurrent put has just re-registered.
    gc_lock: tokio::sync::RwLock<()>,
    /// Bumped after every mutation of a bucket; change pushers wait on it.
    bumps: Mutex<HashMap<BucketId, tokio::sync::watch::Sender<u64>>>,
    /// Set when the server shuts down: connections stop reading.
    closing: tokio::sync::watch::Sender<bool>,
    /// One clone per live connection.
    connections: Arc<()>,
    /// The shared secret clients must present (`restfsd --credentials`).
    token: std::sync::OnceLock<String>,
    pub counters: Counters,
    pub callbacks: crate::callbacks::Callbacks,
    pub delegations: crate::delegation::Delegations,
    pub locks: crate::locks::Locks,
    /// Each client's live connection, by the id it gave in `hello`.
    clients: Mutex<HashMap<String, std::sync::Weak<crate::dispatch::Session>>>,
    /// A group commit is scheduled (see [`Service::spawn_background`]).
    group_pending: AtomicBool,
    group_wake: tokio::sync::Notify,
}

/// Server-wide counters, reported by `admin.stats`.
pub struct Counters {
    pub block_gets: std::sync::atomic::AtomicU64,
    pub block_get_bytes: std::sync::atomic::AtomicU64,
    pub block_puts: std::sync::atomic::AtomicU64,
    pub block_put_bytes: std::sync::atomic::AtomicU64,
    pub requests: std::sync::atomic::AtomicU64,
    /// Batch outcomes dropped from the replay cache because their holder has them.
    pub batch_outcomes_forgotten: std::sync::atomic::AtomicU64,
    /// Requests per method, by index in [`restfs_proto::methods::ALL_METHODS`].
    pub by_method: Box<[std::sync::atomic::AtomicU64]>,
}

impl Default for Counters {
    fn default() -> Counters {
        let zero = std::sync::atomic::AtomicU64::default;
        Counters {
            block_gets: zero(),
            block_get_bytes: zero(),
            block_puts: zero(),
            block_put_bytes: zero(),
            requests: zero(),
            batch_outcomes_forgotten: zero(),
            by_method: restfs_proto::methods::ALL_METHODS.iter().map(|_| zero()).collect(),
        }
    }
}

impl Counters {
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        [
            ("block_gets", get(&self.block_gets)),
            ("block_get_bytes", get(&self.block_get_bytes)),
            ("block_puts", get(&self.block_puts)),
            ("block_put_bytes", get(&self.block_put_bytes)),
            ("requests", get(&self.requests)),
            ("batch_outcomes_forgotten", get(&self.batch_outcomes_forgotten)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            restfs_proto::methods::ALL_METHODS
                .iter()
                .zip(&self.by_method)
                .map(|(name, n)| (format!("requests.{name}"), get(n)))
                .filter(|(_, n)| *n > 0),
        )
        .collect()
    }

    /// Count one request of `method`.
    pub fn count(&self, method: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = restfs_proto::methods::ALL_METHODS.iter().position(|m| *m == method) {
            self.by_method[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Service {
    pub fn new(meta: Arc<dyn MetaStore>, blocks: Arc<dyn BlockStore>) -> Arc<Service> {
        Arc::new(Service {
            meta,
            blocks,
            opens: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            gc_lock: tokio::sync::RwLock::new(()),
            bumps: Mutex::new(HashMap::new()),
            closing: tokio::sync::watch::channel(false).0,
            connections: Arc::new(()),
            counters: Counters::default(),
            callbacks: Default::default(),
            delegations: Default::default(),
            locks: Default::default(),
            clients: Mutex::default(),
            group_pending: AtomicBool::new(false),
            group_wake: tokio::sync::Notify::new(),
            token: std::sync::OnceLock::new(),
        })
    }

    /// `session` is client `client`'s connection now; the one it had
    /// before, if still open, is returned (to be closed: the client has
    /// given up on it).
    pub fn client_connected(&self, client: &str, session: &Arc<crate::dispatch::Session>) -> Option<Arc<crate::dispatch::Session>> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let old = clients.insert(client.to_string(), Arc::downgrade(session))?.upgrade();
        old.filter(|old| !Arc::ptr_eq(old, session))
    }

    /// `session` of client `client` closed.
    pub fn client_gone(&self, client: &str, session: &crate::dispatch::Session) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.get(client).is_some_and(|s| std::ptr::eq(s.as_ptr(), session)) {
            clients.remove(client);
        }
    }

    /// Answer only connections that present `token` in `hello`.
    pub fn require_token(&self, token: String) {
        let _ = self.token.set(token);
    }

    /// The token connections must present, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.get().map(String::as_str)
    }

    /// Run a metadata call. Calls are short (an indexed lookup or a small
    /// transaction in a local database), so they run in place: a hand-off
    /// to the blocking pool and back cost more than the call itself (thread
    /// wake-ups were the largest part of the server's CPU in metadata-heavy
    /// work). Calls that may wait on the disk use [`Service::meta_blocking`].
    pub async fn meta<T: Send + 'static>(&self, f: impl FnOnce(&dyn MetaStore) -> Result<T> + Send + 'static) -> Result<T> {
        f(self.meta.as_ref())
    }

    /// Run a metadata call that may wait on the disk (fsync, a full scan)
    /// on the blocking pool.
    pub async fn meta_blocking<T: Send + 'static>(&self, f: impl FnOnce(&dyn MetaStore) -> Result<T> + Send + 'static) -> Result<T> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || f(meta.as_ref())).await.map_err(|e| Error::Corrupt(format!("task failed: {e}")))?
    }

    /// Run a mutation of bucket `b`: a sync is due and subscribers are woken.
    pub async fn mutate<T: Send + 'static>(&self, b: BucketId, f: impl FnOnce(&dyn MetaStore) -> Result<T> + Send + 'static) -> Result<T> {
        let out = self.meta(f).await;
        self.dirty.store(true, Ordering::Release);
        if !self.group_pending.swap(true, Ordering::AcqRel) {
            self.group_wake.notify_one();
        }
        if DEFERRED_BUMP.try_with(|c| c.set(Some(b))).is_err() {
            self.bump(b);
        }
        out
    }

    /// Run `f` (a request) holding back the subscriber wake-up its mutation
    /// causes; returns it so the caller can wake them once the reply is
    /// queued. A client thus always gets the reply to its own change before
    /// the push describing it.
    pub async fn deferring_bumps<T>(&self, f: impl std::future::Future<Output = T>) -> (T, Option<BucketId>) {
        DEFERRED_BUMP
            .scope(std::cell::Cell::new(None), async move {
                let out = f.await;
                (out, DEFERRED_BUMP.with(|c| c.get()))
            })
            .await
    }

    pub fn bump(&self, b: BucketId) {
        if let Some(tx) = self.bumps.lock().unwrap_or_else(|p| p.into_inner()).get(&b) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// The reply already sent to this request of this client, if any.
    pub async fn replayed(&self, client: String, request: String) -> Option<Vec<u8>> {
        self.meta(move |m| m.reply(&client, &request)).await.unwrap_or_else(|e| {
            tracing::error!("replay cache lookup failed: {e}");
            None
        })
    }

    /// Forget the outcomes of these batches: their holder has them.
    pub async fn forget_batches(&self, tokens: Vec<String>) {
        let n = tokens.len() as u64;
        match self.meta(move |m| m.forget_replies(BATCH_REPLIES, &tokens)).await {
            Ok(()) => {
                self.counters.batch_outcomes_forgotten.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => tracing::error!("replay cache trim failed: {e}"),
        }
    }

    /// Remember a reply so a retry after a reconnection (or restart) gets it again.
    pub async fn remember(&self, client: String, request: String, reply: Vec<u8>) {
        if let Err(e) = self.meta(move |m| m.remember_reply(&client, &request, &reply)).await {
            tracing::error!("replay cache write failed: {e}");
        }
    }

    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Held by a connection while it lives.
    pub fn connection_token(&self) -> Arc<()> {
        self.connections.clone()
    }

    /// Stop reading requests, let the ones in flight finish (up to `grace`),
    /// then make everything durable.
    pub async fn shut_down(&self, grace: Duration) -> Result<()> {
        // The connections' locks go now; their clients will take them again.
        self.locks.stop_tidying();
        self.closing.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&self.connections) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sync().await
    }

    /// A receiver woken after every mutation of bucket `b`.
    pub fn watch(&self, b: BucketId) -> tokio::sync::watch::Receiver<u64> {
        let mut bumps = self.bumps.lock().unwrap_or_else(|p| p.into_inner());
        bumps.entry(b).or_insert_with(|| tokio::sync::watch::channel(0).0).subscribe()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn BlockStore, &dyn MetaStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (blocks, meta) = (self.blocks.clone(), self.meta.clone());
        tokio::task::spawn_blocking(move || f(blocks.as_ref(), meta.as_ref()))
            .await
            .map_err(|e| Error::Corrupt(format!("task failed: {e}")))?
    }

    /// Verify and store blocks, then register them.
    pub async fn put_blocks(&self, blocks: Vec<(Hash, Vec<u8>)>) -> Result<()> {
        let _shared = self.gc_lock.read().await;
        self.counters.block_puts.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.counters.block_put_bytes.fetch_add(blocks.iter().map(|(_, d)| d.len() as u64).sum(), Ordering::Relaxed);
        // Small blocks only go to the metadata store: in place, like other
        // metadata calls; the block store may wait on the disk.
        if blocks.iter().map(|(_, d)| d.len()).sum::<usize>() <= INLINE_MAX {
            let (store, meta) = (self.blocks.clone(), self.meta.clone());
            return put_verified(store.as_ref(), meta.as_ref(), blocks);
        }
        self.blocking(move |store, meta| put_verified(store, meta, blocks)).await
    }

    /// A block's bytes, checked against its hash.
    pub async fn get_block(&self, hash: Hash) -> Result<Vec<u8>> {
        self.counters.block_gets.fetch_add(1, Ordering::Relaxed);
        let data = self
            .blocking(move |store, meta| {
                let data = match meta.block_location(&hash)? {
                    BlockLocation::Inline(data) => data,
                    BlockLocation::External => store.get(&hash)?,
                };
                if Hash::of(&data) != hash {
                    return Err(Error::Corrupt(format!("block {hash} is corrupt on the server's disk")));
                }
                Ok(data)
            })
            .await?;
        self.counters.block_get_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    pub async fn space(&self) -> Result<(u64, u64)> {
        self.blocking(|store, _| store.space()).await
    }

    /// Make every commit so far durable.
    pub async fn sync(&self) -> Result<()> {
        self.dirty.store(false, Ordering::Release);
        self.meta_blocking(|m| m.sync()).await
    }

    /// Forget unreferenced blocks older than `min_age_secs`; returns (blocks, bytes).
    pub async fn collect_garbage(&self, min_age_secs: u64) -> Result<(u64, u64)> {
        let _exclusive = self.gc_lock.write().await;
        self.blocking(move |store, meta| {
            let g = meta.collect_garbage(min_age_secs)?;
            // The metadata forgot them already: once a delete fails (the
            // store is away, and each try waits), the rest stay in the store,
            // unreferenced, rather than hold up writes (they wait on gc_lock).
            for (done, hash) in g.external.iter().enumerate() {
                if let Err(e) = store.delete(hash) {
                    tracing::warn!("garbage collection: {} unreferenced blocks stay in the block store ({e})", g.external.len() - done);
                    break;
                }
            }
            Ok((g.blocks, g.bytes))
        })
        .await
    }

    /// The unlinked files left open when the server last stopped go once
    /// their clients, reconnecting, had `grace` to open them again.
    pub fn purge_left_open(self: &Arc<Self>, orphans: Vec<(BucketId, Ino)>, grace: Duration) {
        if orphans.is_empty() {
            return;
        }
        let me = self.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                // Stopped meanwhile: the next start purges them.
                _ = closing.changed() => return,
            }
            tracing::info!("{} unlinked files were left open at the last stop: those nobody opened again go", orphans.len());
            for (b, ino) in orphans {
                if let Err(e) = me.purge_unless_open(b, ino).await {
                    tracing::error!("removing unlinked inode {ino} left open at the last stop: {e}");
                }
            }
        });
    }

    pub fn is_open(&self, bucket: BucketId, ino: Ino) -> bool {
        self.opens.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&(bucket, ino))
    }

    pub fn register_open(&self, bucket: BucketId, ino: Ino) {
        *self.opens.lock().unwrap_or_else(|p| p.into_inner()).entry((bucket, ino)).or_insert(0) += 1;
    }

    /// Purge inode `ino` if it is unlinked and nobody holds it open.
    pub async fn purge_unless_open(self: &Arc<Self>, bucket: BucketId, ino: Ino) -> Result<()> {
        let me = self.clone();
        if self.meta(move |m| m.purge(bucket, ino, &|i| me.is_open(bucket, i))).await? {
            self.dirty.store(true, Ordering::Release);
            self.bump(bucket);
        }
        Ok(())
    }

    /// Drop one open; purge the inode if that was the last and it is unlinked.
    pub async fn release(self: &Arc<Self>, bucket: BucketId, ino: Ino) -> Result<()> {
        // Not while shutting down: the connections close, yet their clients
        // will open their files again on the next server (see
        // `purge_left_open`), and meanwhile an unlink must still find them open.
        if *self.closing.borrow() {
            return Ok(());
        }
        let last = {
            let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
            match opens.get_mut(&(bucket, ino)) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    opens.remove(&(bucket, ino));
                    true
                }
                None => false,
            }
        };
        if last {
            // Most files released were never unlinked: a read, not a mutation.
            self.purge_unless_open(bucket, ino).await?;
        }
        Ok(())
    }

    /// Background duties: group commit, group sync and periodic garbage collection.
    pub fn spawn_background(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.group_wake.notified().await;
                tokio::time::sleep(crate::meta::sqlite::GROUP_WINDOW).await;
                me.group_pending.store(false, Ordering::Release);
                if let Err(e) = me.meta(|m| m.commit_group()).await {
                    tracing::error!("group commit failed: {e}");
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_INTERVAL);
            loop {
                tick.tick().await;
                if me.dirty.load(Ordering::Acquire)
                    && let Err(e) = me.sync().await
                {
                    tracing::error!("group sync failed: {e}");
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // Not once shutting down: the connections' locks go, yet their
            // clients will take them again from the next server.
            while !*me.closing.borrow() {
                me.locks.tidy_marker(|| me.delegations.holders());
                tick.tick().await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if let Err(e) = me.meta_blocking(|m| m.trim_changes(CHANGE_LOG_KEEP)).await {
                    tracing::error!("change log trim failed: {e}");
                }
                if let Err(e) = me.meta_blocking(|m| m.trim_replies(REPLAY_KEEP_SECS, BATCH_REPLIES, BATCH_REPLY_KEEP_SECS)).await {
                    tracing::error!("replay cache trim failed: {e}");
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GC_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.collect_garbage(GC_MIN_AGE_SECS).await {
                    Ok((n, bytes)) if n > 0 => {
                        tracing::info!("garbage collection removed {n} blocks ({bytes} bytes)")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!("garbage collection failed: {e}"),
                }
            }
        });
    }
}

/// Verify blocks against their hashes and store them: small ones in the
/// metadata store, others in the block store, then registered.
fn put_verified(store: &dyn BlockStore, meta: &dyn MetaStore, blocks: Vec<(Hash, Vec<u8>)>) -> Result<()> {
    for (hash, data) in blocks {
        if data.len() > MAX_BLOCK_SIZE as usize {
            return Err(Error::fs(Errno::EFBIG, format!("block of {} bytes exceeds the {MAX_BLOCK_SIZE}-byte limit", data.len())));
        }
        if Hash::of(&data) != hash {
            return Err(Error::fs(Errno::EINVAL, format!("block content does not match its hash {hash}")));
        }
        if data.len() <= INLINE_MAX {
            meta.add_block(&hash, data.len() as u32, Some(&data))?;
        } else {
            store.put(&hash, &data)?;
            meta.add_block(&hash, data.len() as u32, None)?;
        }
    }
    Ok(())
}
