//! Write-behind under a delegation (see `restfsd`'s `delegation`). While
//! this mount alone has the bucket mounted, the server delegates the bucket
//! to it: the core then answers creates, removals, renames and commits from
//! its caches, and they queue here. One task sends the queue in order, in
//! batches (`fs.batch`); while one batch is in flight the next one fills.
//! Any other request whose answer could depend on queued changes first
//! waits until the queue is empty ([`Delegation::drained`]).
//!
//! A recall (another mount arrived) stops local answers, sends what is
//! queued and returns the delegation. A queued change the server refuses
//! (which the caches said would succeed) is logged, its traces are dropped
//! from the caches, and the next `fsync` or `syncfs` reports it.

use super::error::FsError;
use super::journal::{Journal, Leftover};
use crate::client::Link;
use restfs_proto::methods::{Batch, BatchOp, BatchParams, Delegate, DelegateParams, DelegateReturn, Empty};
use restfs_proto::{Attr, Errno, Ino, RpcError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Inode numbers asked for at a time.
const RESERVE: u64 = 4096;
/// Most changes sent in one batch.
const MAX_BATCH: usize = 512;
/// Most changes queued, and most bytes of file data they carry: further
/// local answers wait for room (this bounds the daemon's memory).
const MAX_QUEUE: u64 = 4096;
const MAX_QUEUE_BYTES: u64 = 32 << 20;
/// How long the sender waits for more changes before sending a batch
/// that nobody waits for.
const LINGER: Duration = Duration::from_micros(500);

/// Tokens of acknowledged batches are passed on for the server to forget
/// (`BatchParams::forget`) this often, or once this many wait, each time
/// after syncing the log that records their acknowledgement.
const FORGET_EVERY: Duration = Duration::from_secs(5);
const FORGET_AT_MOST: usize = 256;

/// What to do with a queued change's outcome.
pub type Then = Box<dyn FnOnce(&Result<Option<Attr>, RpcError>) + Send>;

/// The outcome of one queued change, as [`Delegation::run`] reports failures.
pub type Failure = (BatchOp, RpcError);

struct Queued {
    op: BatchOp,
    then: Option<Then>,
}

/// Where this mount stands with the bucket's delegation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Not delegated to this mount.
    #[default]
    Not,
    /// Granted; the pushes sent before the grant are still being applied.
    Granted,
    /// Local answers may go on.
    Active,
    /// The server asked for it back: no more local answers; the queue drains.
    Recalled,
}

#[derive(Default)]
struct State {
    hold: Hold,
    /// Reserved inode numbers not used yet.
    inos: std::ops::Range<Ino>,
    asking_inos: bool,
    queue: VecDeque<Queued>,
    /// Somebody waits for the queue: send without lingering.
    hurry: bool,
    /// The first refused change not reported yet.
    failed: Option<FsError>,
    /// Where queued changes are logged before they are answered.
    journal: Option<Journal>,
    /// Tokens of acknowledged batches the server still remembers, and since
    /// when the oldest of them waits.
    answered: Vec<String>,
    answered_since: Option<std::time::Instant>,
    /// Lock requests on their way to the server ([`ServerLockCall`]), and
    /// whether [`Delegation::ready`] waits for them to end.
    lock_calls: u32,
    ready_waits: bool,
}

pub struct Delegation {
    me: std::sync::Weak<Delegation>,
    link: Link,
    st: Mutex<State>,
    /// Changes queued so far, and acknowledged so far.
    queued: AtomicU64,
    /// Bytes of file data in changes not yet acknowledged.
    queued_bytes: AtomicU64,
    acked: watch::Sender<u64>,
    /// Wakes the sender when the queue gets its first change.
    wake: Notify,
    /// Wakes a lingering sender: somebody waits for the queue.
    hurry: Notify,
    /// Bumped by every local answer (see `Fs::opendir`).
    local_changes: AtomicU64,
    /// Queue position of the last change the log could not take.
    unlogged_upto: AtomicU64,
}

/// A local answer in progress, under the delegation's lock.
pub struct Local<'a> {
    d: &'a Delegation,
    st: std::sync::MutexGuard<'a, State>,
}

impl Local<'_> {
    /// A fresh inode number, if any is left.
    pub fn ino(&mut self) -> Option<Ino> {
        let ino = self.st.inos.next()?;
        if self.st.inos.end - self.st.inos.start < RESERVE / 4 && !self.st.asking_inos {
            self.st.asking_inos = true;
            self.d.ask_inos();
        }
        Some(ino)
    }

    /// Queue `op`; `then` runs with its outcome.
    pub fn push(&mut self, op: BatchOp, then: Option<Then>) {
        let logged = match self.st.journal.as_mut().map(|j| j.append(&op)) {
            Some(Err(e)) => {
                tracing::warn!(
                    "cannot log a change in the delegation log: its answer waits for the server, and so do the next changes' until the queue is empty ({e})"
                );
                false
            }
            _ => true,
        };
        self.d.queued_bytes.fetch_add(data_bytes(&op), Ordering::AcqRel);
        self.st.queue.push_back(Queued { op, then });
        let position = self.d.queued.fetch_add(1, Ordering::AcqRel) + 1;
        if !logged {
            self.d.unlogged_upto.fetch_max(position, Ordering::AcqRel);
        }
        self.d.local_changes.fetch_add(1, Ordering::AcqRel);
        if self.st.queue.len() == 1 {
            self.d.wake.notify_one();
        }
    }
}

impl State {
    /// The batch named `token` is acknowledged (and logged so).
    fn answered(&mut self, token: String) {
        self.answered.push(token);
        self.answered_since.get_or_insert_with(std::time::Instant::now);
    }
}

/// A batch token no other batch of any mount will have.
fn new_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{now:x}-{:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Bytes of file data `op` carries.
fn data_bytes(op: &BatchOp) -> u64 {
    match op {
        BatchOp::Commit { commit, .. } => commit.blocks.iter().map(|b| b.data.0.len() as u64).sum(),
        _ => 0,
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Delegation {
    pub fn new(link: Link) -> Arc<Delegation> {
        Arc::new_cyclic(|me| Delegation {
            me: me.clone(),
            link,
            st: Mutex::default(),
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            acked: watch::Sender::new(0),
            wake: Notify::new(),
            hurry: Notify::new(),
            local_changes: AtomicU64::new(0),
            unlogged_upto: AtomicU64::new(0),
        })
    }

    /// Does this mount hold the delegation (and may answer locally)?
    pub fn active(&self) -> bool {
        lock(&self.st).hold == Hold::Active
    }

    /// Changes queued and not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.queued.load(Ordering::Acquire).saturating_sub(*self.acked.borrow())
    }

    /// Local answers so far.
    pub fn local_changes(&self) -> u64 {
        self.local_changes.load(Ordering::Acquire)
    }

    /// Run `f` as a local answer if the delegation is held, holding it
    /// until `f` has queued its change. `None` when not held.
    pub fn local<T>(&self, f: impl FnOnce(&mut Local<'_>) -> Option<T>) -> Option<T> {
        let st = lock(&self.st);
        if st.hold != Hold::Active || st.journal.as_ref().is_some_and(Journal::is_off) {
            return None;
        }
        f(&mut Local { d: self, st })
    }

    /// Where a lock request is decided: here by `f` if the delegation is
    /// held (under its lock, so a recall waits for `f`), else on the server.
    /// A server call counts as in flight until its [`ServerLockCall`] drops,
    /// and the delegation does not become active meanwhile: a lock the
    /// server grants is in the mount's table before the table answers alone.
    pub fn route_lock<T>(&self, f: impl FnOnce() -> T) -> LockRoute<'_, T> {
        let mut st = lock(&self.st);
        match st.hold {
            Hold::Active => LockRoute::Here(f()),
            // No new server calls once the grant waits for those in flight.
            Hold::Recalled => LockRoute::Wait,
            Hold::Granted if st.ready_waits => LockRoute::Wait,
            Hold::Not | Hold::Granted => {
                st.lock_calls += 1;
                LockRoute::Server(ServerLockCall(self))
            }
        }
    }

    /// Wait while a lock request can be decided neither here nor on the
    /// server: a recall is under way, or the grant waits for lock requests
    /// in flight ([`Delegation::route_lock`]).
    pub async fn lock_route_open(&self) {
        loop {
            {
                let st = lock(&self.st);
                if !(st.hold == Hold::Recalled || st.hold == Hold::Granted && st.ready_waits) {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// [`Delegation::local`], then, if the log could not take the change,
    /// wait until the server has it: no answer rests on memory alone.
    pub async fn answer<T>(&self, f: impl FnOnce(&mut Local<'_>) -> Option<T>) -> Option<T> {
        let out = self.local(f);
        if out.is_some() {
            self.logged_or_sent().await;
        }
        out
    }

    /// Wait until the server has every change the log could not take.
    pub async fn logged_or_sent(&self) {
        let upto = self.unlogged_upto.load(Ordering::Acquire);
        if upto == 0 || *self.acked.borrow() >= upto {
            return;
        }
        self.hurry_up();
        let mut acked = self.acked.subscribe();
        let _ = acked.wait_for(|a| *a >= upto).await;
    }

    /// Wait until there is room in the queue (before a local answer).
    pub async fn room(&self) {
        let mut acked = self.acked.subscribe();
        let _ = acked
            .wait_for(|a| {
                self.queued.load(Ordering::Acquire) < a + MAX_QUEUE && self.queued_bytes.load(Ordering::Acquire) < MAX_QUEUE_BYTES
            })
            .await;
    }

    /// Wait until every change queued so far is acknowledged.
    pub async fn drained(&self) {
        let target = self.queued.load(Ordering::Acquire);
        if *self.acked.borrow() >= target {
            return;
        }
        self.hurry_up();
        let mut acked = self.acked.subscribe();
        let _ = acked.wait_for(|a| *a >= target).await;
    }

    /// Somebody waits for the queue: send it without lingering.
    fn hurry_up(&self) {
        lock(&self.st).hurry = true;
        self.hurry.notify_one();
        self.wake.notify_one();
    }

    /// The first refused change since the last call, if any.
    pub fn take_failure(&self) -> Option<FsError> {
        lock(&self.st).failed.take()
    }

    /// Ask the server for the delegation (and inode numbers). Granted,
    /// returns how many pushes had arrived with the reply: local answers
    /// start once those are applied ([`Delegation::ready`]).
    pub async fn acquire(&self) -> Option<u64> {
        if lock(&self.st).hold != Hold::Not {
            return None;
        }
        match self.link.call_seen::<Delegate>(DelegateParams { inos: RESERVE }).await {
            (Ok(r), seen) if r.granted => {
                let mut st = lock(&self.st);
                st.hold = Hold::Granted;
                st.ready_waits = false;
                st.inos = r.first..r.first + r.count;
                tracing::debug!("bucket delegated to this mount (inodes {}..{})", r.first, r.first + r.count);
                Some(seen)
            }
            (Ok(_), _) => None,
            (Err(e), _) => {
                tracing::debug!("fs.delegate: {e}");
                None
            }
        }
    }

    /// The caches have caught up with the grant: answer locally, once no
    /// lock request is on its way to the server.
    pub fn ready(&self) {
        let mut st = lock(&self.st);
        if st.hold == Hold::Granted {
            if st.lock_calls == 0 {
                st.hold = Hold::Active;
            } else {
                st.ready_waits = true;
            }
        }
    }

    /// Reserve more inode numbers, in the background.
    fn ask_inos(&self) {
        let (link, me) = (self.link.clone(), self.me.clone());
        tokio::spawn(async move {
            let r = link.call::<Delegate>(DelegateParams { inos: RESERVE }).await;
            let Some(me) = me.upgrade() else { return };
            let mut st = lock(&me.st);
            st.asking_inos = false;
            match r {
                // Numbers in use are consumed in order: the new range follows.
                Ok(r) if r.granted && st.hold != Hold::Not => st.inos = st.inos.start.max(r.first)..r.first + r.count,
                Ok(_) => {}
                Err(e) => tracing::debug!("fs.delegate for more inodes: {e}"),
            }
        });
    }

    /// The server recalled the delegation: stop answering locally, send
    /// what is queued, run `before_return`, and return it.
    pub async fn recall(&self, before_return: impl std::future::Future<Output = ()>) {
        {
            let mut st = lock(&self.st);
            if st.hold == Hold::Not {
                return;
            }
            st.hold = Hold::Recalled;
            st.ready_waits = false;
        }
        self.drained().await;
        before_return.await;
        if let Err(e) = self.link.call::<DelegateReturn>(Empty {}).await {
            tracing::warn!("returning the delegation: {e}");
        }
        let mut st = lock(&self.st);
        st.hold = Hold::Not;
        st.inos = 0..0;
        tracing::debug!("delegation returned");
    }

    /// Send the queue, in order, until the core goes; `failed` hears of
    /// every change the server refused.
    pub async fn run(self: Arc<Self>, failed: impl Fn(Vec<Failure>) + Send) {
        loop {
            // Wait for work. After a pause, let more join the first change
            // for a moment, unless somebody waits; while a batch was in
            // flight the next one filled already.
            let mut paused = false;
            loop {
                let woken = self.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if !lock(&self.st).queue.is_empty() {
                    break;
                }
                paused = true;
                woken.await;
            }
            if paused {
                let hurried = self.hurry.notified();
                tokio::pin!(hurried);
                hurried.as_mut().enable();
                let (len, hurry) = {
                    let st = lock(&self.st);
                    (st.queue.len(), st.hurry)
                };
                if !hurry && len < MAX_BATCH {
                    let _ = tokio::time::timeout(LINGER, hurried).await;
                }
            }
            let batch: Vec<Queued> = {
                let mut st = lock(&self.st);
                let n = st.queue.len().min(MAX_BATCH);
                let batch = st.queue.drain(..n).collect();
                if st.queue.is_empty() {
                    st.hurry = false;
                }
                batch
            };
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            let bytes: u64 = batch.iter().map(|q| data_bytes(&q.op)).sum();
            let (ops, thens): (Vec<BatchOp>, Vec<Option<Then>>) = batch.into_iter().map(|q| (q.op, q.then)).unzip();
            let token = new_token();
            if let Some(j) = lock(&self.st).journal.as_mut()
                && let Err(e) = j.sending(&token, n)
            {
                tracing::warn!("delegation log: {e} (dropped until the queue is empty: a crash meanwhile would lose what is queued)");
            }
            let forget = self.forgettable().await;
            let reply = self.link.call::<Batch>(BatchParams { ops: ops.clone(), token: Some(token.clone()), forget }).await;
            let outcomes: Vec<Result<Option<Attr>, RpcError>> = match reply {
                Ok(r) if r.outcomes.len() == ops.len() => r
                    .outcomes
                    .into_iter()
                    .map(|o| match o.error {
                        Some(e) => Err(e),
                        None => Ok(o.attr),
                    })
                    .collect(),
                Ok(r) => {
                    let e =
                        RpcError::errno(Errno::EIO, format!("fs.batch answered {} outcomes for {} changes", r.outcomes.len(), ops.len()));
                    vec![Err(e); ops.len()]
                }
                Err(e) => vec![Err(e); ops.len()],
            };
            let mut failures = Vec::new();
            for ((op, then), outcome) in ops.into_iter().zip(thens).zip(outcomes) {
                if let Some(then) = then {
                    then(&outcome);
                }
                if let Err(e) = outcome {
                    failures.push((op, e));
                }
            }
            if let Some((_, e)) = failures.first() {
                let mut st = lock(&self.st);
                if st.failed.is_none() {
                    st.failed =
                        Some(FsError::new(e.as_errno(), format!("a change made under the delegation failed on the server: {}", e.message)));
                }
            }
            if !failures.is_empty() {
                failed(failures);
            }
            {
                let mut st = lock(&self.st);
                let idle = st.queue.is_empty();
                if let Some(j) = st.journal.as_mut()
                    && let Err(e) = j.acked(n, idle)
                {
                    tracing::warn!("delegation log: {e} (dropped until the queue is empty: a crash meanwhile would lose what is queued)");
                }
                st.answered(token);
            }
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.acked.send_modify(|a| *a += n);
        }
    }

    /// Log queued changes in `journal` from now on, after sending what a
    /// previous mount left in it. Returns how many of those the server
    /// refused.
    pub async fn replay_and_log(&self, mut journal: Journal, left: Leftover) -> usize {
        let total = left.ops.len();
        let (first, in_flight) = match left.in_flight {
            Some((token, n)) => (n, Some(token)),
            None => (0, None),
        };
        // The batch in flight at the crash under its own token; then the rest.
        let mut batches: Vec<(&[BatchOp], String)> = Vec::new();
        if let Some(token) = in_flight {
            batches.push((&left.ops[..first], token));
        }
        batches.extend(left.ops[first..].chunks(MAX_BATCH).map(|c| (c, new_token())));
        let mut refused = 0;
        let mut sent = Vec::new();
        for (ops, token) in batches.into_iter().filter(|(ops, _)| !ops.is_empty()) {
            match self.link.call::<Batch>(BatchParams { ops: ops.to_vec(), token: Some(token.clone()), forget: Vec::new() }).await {
                Ok(r) => {
                    sent.push(token);
                    for (op, outcome) in ops.iter().zip(r.outcomes) {
                        if let Some(e) = outcome.error {
                            tracing::warn!("a change the last mount made was refused by the server: {op:?}: {e}");
                            refused += 1;
                        }
                    }
                }
                Err(e) => {
                    match journal.set_aside() {
                        Ok(kept) => {
                            tracing::error!("cannot send the {total} changes the last mount left unsent ({e}); kept in {}", kept.display())
                        }
                        Err(io) => tracing::error!("cannot send the changes the last mount left unsent ({e}), nor keep them: {io}"),
                    }
                    lock(&self.st).journal = Some(journal);
                    return total;
                }
            }
        }
        if total > 0 {
            tracing::info!("sent {} changes the last mount had made but not sent", total - refused);
        }
        if let Err(e) = journal.clear() {
            tracing::warn!("delegation log: {e}");
        }
        let mut st = lock(&self.st);
        st.journal = Some(journal);
        sent.into_iter().for_each(|token| st.answered(token));
        refused
    }

    /// Tokens of acknowledged batches the server may forget now: none of
    /// them will be sent again, even by the next mount after a machine
    /// crash, once the log's record of their acknowledgement is on disk.
    async fn forgettable(&self) -> Vec<String> {
        let (tokens, log) = {
            let mut st = lock(&self.st);
            let due = st.answered.len() >= FORGET_AT_MOST || st.answered_since.is_some_and(|t| t.elapsed() >= FORGET_EVERY);
            if !due {
                return Vec::new();
            }
            st.answered_since = None;
            (std::mem::take(&mut st.answered), st.journal.as_ref().map(Journal::handle))
        };
        let Some(log) = log else { return tokens };
        let synced = tokio::task::spawn_blocking(move || log.and_then(|f| f.sync_data())).await;
        match synced.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(()) => tokens,
            Err(e) => {
                // Not told to forget them, the server keeps them for weeks.
                tracing::warn!("delegation log: {e}");
                Vec::new()
            }
        }
    }

    /// The connection was replaced: the server dropped the delegation.
    pub fn lost(&self) {
        let mut st = lock(&self.st);
        st.hold = Hold::Not;
        st.inos = 0..0;
        st.ready_waits = false;
    }
}

/// See [`Delegation::route_lock`].
pub enum LockRoute<'a, T> {
    /// Decided here, under the delegation.
    Here(T),
    /// To be asked of the server, with this call counted in flight.
    Server(ServerLockCall<'a>),
    /// Ask again after [`Delegation::lock_route_open`].
    Wait,
}

/// A lock request on its way to the server; dropped once the mount's
/// table has its outcome.
pub struct ServerLockCall<'a>(&'a Delegation);

impl Drop for ServerLockCall<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.st);
        st.lock_calls -= 1;
        if st.lock_calls == 0 && std::mem::take(&mut st.ready_waits) && st.hold == Hold::Granted {
            st.hold = Hold::Active;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock request on its way to the server when the delegation is
    /// granted keeps the table from answering alone until it is back.
    #[tokio::test]
    async fn the_delegation_waits_for_lock_requests_in_flight() {
        let data = tempfile::tempdir().unwrap();
        let server = restfs_server::Server::start("127.0.0.1:0".parse().unwrap(), data.path()).await.unwrap();
        let url = crate::client::ServerUrl::parse(&format!("ws://{}/b", server.addr)).unwrap();
        let d = Delegation::new(Link::connect(&url, Duration::from_secs(5)).await.unwrap());
        let LockRoute::Server(call) = d.route_lock(|| ()) else { panic!("not delegated: the server decides") };
        lock(&d.st).hold = Hold::Granted;
        d.ready();
        assert!(matches!(d.route_lock(|| ()), LockRoute::Wait), "a lock call is in flight: new ones wait for the grant");
        drop(call);
        assert!(d.active(), "active once the call is back");
        assert!(matches!(d.route_lock(|| 7), LockRoute::Here(7)));
        server.shutdown().await.unwrap();
    }
}
