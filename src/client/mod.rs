//! The client side of the link: one WebSocket carrying JSON-RPC, kept up
//! across outages.
//!
//! [`Link::call`] sends a typed request and awaits its response; many calls
//! may be in flight at once (responses are matched by id). The link speaks
//! BSON after `hello` so block payloads travel as binary.
//!
//! When the connection drops, a supervisor reconnects with backoff, says
//! `hello` again with the same client id, runs the restore hook (the core
//! re-mounts its bucket, re-registers open files and resubscribes from the
//! last change it applied), then resends every unanswered request under
//! its original id; the server's replay cache answers a repeated mutation
//! without applying it twice. Calls made during the outage wait. Only an
//! outage longer than the reconnect timeout fails them (ETIMEDOUT).
//!
//! With callbacks, every answer renews the client's lease, counted from
//! when the request was sent; a ping renews it when the link is idle. The
//! lease ends at once when the connection drops.

pub mod url;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use restfs_proto::methods::{Change, Hello, HelloParams, PushChanges, PushParams, Recall};
use restfs_proto::rpc::{IdField, RawMessage, encode_request, split_frame};
use restfs_proto::{Encoding, Errno, Id, Ino, MAX_FRAME, Method, PROTOCOL_VERSION, RpcError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use url::ServerUrl;

/// Work to redo on every new connection before queued calls resume.
pub type RestoreHook = Arc<dyn Fn(Link) -> BoxFuture<'static, Result<(), RpcError>> + Send + Sync>;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Part of the server's lease the client relies on (margin for clock drift).
const LEASE_USE: f64 = 0.9;

/// A connection to restfsd that survives outages. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    url: ServerUrl,
    /// Presented in every `hello`.
    token: Option<String>,
    client_id: String,
    reconnect_timeout: Duration,
    state: Mutex<State>,
    pending: Mutex<HashMap<i64, PendingCall>>,
    next_id: AtomicI64,
    /// Bumped when a connection is up and restored.
    generation: watch::Sender<u64>,
    pushes: Mutex<Option<mpsc::UnboundedSender<PushParams>>>,
    /// Counts the server's `fs.recall` notifications.
    recalls: watch::Sender<u64>,
    restore: Mutex<Option<RestoreHook>>,
    server: Mutex<String>,
    /// The capabilities the server granted in `hello`.
    capabilities: Mutex<Vec<String>>,
    reconnects: AtomicU64,
    pushes_seen: AtomicU64,
    /// The directory entries named by the last [`RECENT_PUSHES`] pushes,
    /// by push number (`None`: a reset, which touches everything).
    recent: Mutex<VecDeque<(u64, Option<Vec<PushedEntry>>)>>,
    /// The lease the server grants with callbacks (from `hello`).
    lease: Mutex<Option<Duration>>,
    /// The lease runs until this many ns after `epoch` (0: none).
    lease_until: AtomicU64,
    epoch: Instant,
}

/// A directory entry as a push reported it: parent, name, what it names.
type PushedEntry = (Ino, Vec<u8>, Option<Ino>);

/// Pushes remembered for [`Link::entries_crossed`].
const RECENT_PUSHES: usize = 4096;

struct State {
    /// Outgoing frames of the live connection.
    out: Option<mpsc::Sender<Message>>,
    encoding: Encoding,
    /// Generation of the live connection.
    generation: u64,
    /// The connection is being restored: only restore calls may go out.
    restoring: bool,
    /// Down for longer than the reconnect timeout: calls fail at once.
    failed: bool,
}

struct PendingCall {
    frame: Vec<u8>,
    encoding: Encoding,
    /// Generation of the connection it was last sent on (0: not sent).
    sent_on: u64,
    /// When it was (last) sent, or a moment before: its answer proves the
    /// server heard from this client after that.
    sent_at: Instant,
    /// The reply, and how many pushes had arrived before it.
    tx: oneshot::Sender<(RawMessage, u64)>,
}

fn lost() -> RpcError {
    RpcError::errno(Errno::ENOTCONN, "connection to the server lost")
}

fn timed_out(t: Duration) -> RpcError {
    RpcError::errno(Errno::ETIMEDOUT, format!("server unreachable for longer than the reconnect timeout ({t:?})"))
}

/// One WebSocket, handshaken. Its reader task routes replies and pushes.
async fn open_socket(link: &Link, timeout: Duration) -> Result<(mpsc::Sender<Message>, tokio::task::JoinHandle<()>), String> {
    let url = &link.inner.url;
    let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME)).max_frame_size(Some(MAX_FRAME));
    let connecting = tokio_tungstenite::connect_async_with_config(url.endpoint(), Some(config), true);
    let (ws, _) = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(format!("server {} did not answer within {timeout:?}", url.authority)),
        Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", url.authority)),
        Ok(Ok(ok)) => ok,
    };
    let (mut sink, mut source) = ws.split();
    let (out, mut rx) = mpsc::channel::<Message>(256);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let reader_link = link.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            let (enc, bytes) = match msg {
                Message::Text(t) => (Encoding::Json, t.as_bytes().to_vec()),
                Message::Binary(b) => (Encoding::Bson, b.to_vec()),
                Message::Close(_) => break,
                _ => continue,
            };
            match split_frame(enc, &bytes) {
                Ok(frame) => frame.messages.into_iter().for_each(|m| reader_link.route(m)),
                Err(e) => tracing::warn!("unparseable frame from the server: {e}"),
            }
        }
    });
    Ok((out, reader))
}

impl Link {
    /// Connect to `url` and negotiate with `hello`, within `timeout`.
    /// Later outages shorter than `reconnect_timeout` are ridden out.
    pub async fn connect(url: &ServerUrl, timeout: Duration) -> Result<Link, String> {
        Link::connect_with(url, timeout, Duration::from_secs(60), None).await
    }

    /// The same, presenting `token` (see `restfs_proto::credentials`).
    pub async fn connect_with(
        url: &ServerUrl,
        timeout: Duration,
        reconnect_timeout: Duration,
        token: Option<String>,
    ) -> Result<Link, String> {
        let client_id = format!("{:016x}{:016x}", rand_u64(), rand_u64());
        let link = Link {
            inner: Arc::new(Inner {
                url: url.clone(),
                token,
                client_id,
                reconnect_timeout,
                state: Mutex::new(State { out: None, encoding: Encoding::Json, generation: 0, restoring: true, failed: false }),
                pending: Mutex::default(),
                next_id: AtomicI64::new(1),
                generation: watch::channel(0).0,
                pushes: Mutex::default(),
                recalls: watch::channel(0).0,
                restore: Mutex::default(),
                server: Mutex::default(),
                capabilities: Mutex::default(),
                reconnects: AtomicU64::new(0),
                pushes_seen: AtomicU64::new(0),
                recent: Mutex::default(),
                lease: Mutex::default(),
                lease_until: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        };
        let reader = link.establish(timeout).await?;
        link.finish_restore();
        link.watch_connection(reader);
        link.keep_lease();
        Ok(link)
    }

    /// Did the server grant callbacks (and so expects push acknowledgements)?
    pub fn has_callbacks(&self) -> bool {
        self.inner.lease.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Is the lease current? Then every change other clients made before
    /// now has been pushed to this client, or the server is still waiting
    /// for this client to acknowledge it (see `restfsd`'s callbacks).
    pub fn lease_valid(&self) -> bool {
        let until = self.inner.lease_until.load(Ordering::Acquire);
        until > 0 && (self.inner.epoch.elapsed().as_nanos() as u64) < until && !self.state().restoring
    }

    /// An answer arrived to a request sent at `sent_at`: the lease runs
    /// (a safety margin less than) a lease from then.
    fn extend_lease(&self, sent_at: Instant) {
        let Some(lease) = *self.inner.lease.lock().unwrap_or_else(|p| p.into_inner()) else { return };
        let until = sent_at.saturating_duration_since(self.inner.epoch) + lease.mul_f64(LEASE_USE);
        self.inner.lease_until.fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Renew the lease with a ping when no other answer did for a while.
    fn keep_lease(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let lease = match weak.upgrade() {
                    Some(inner) => *inner.lease.lock().unwrap_or_else(|p| p.into_inner()),
                    None => return,
                };
                let Some(lease) = lease else { return };
                tokio::time::sleep(lease / 8).await;
                let Some(inner) = weak.upgrade() else { return };
                let link = Link { inner };
                let left = (link.inner.lease_until.load(Ordering::Acquire) as u128).saturating_sub(link.inner.epoch.elapsed().as_nanos());
                if left < (lease / 2).as_nanos() && !link.state().restoring {
                    let _ = tokio::time::timeout(lease, link.call::<restfs_proto::methods::Ping>(restfs_proto::methods::Empty {})).await;
                }
            }
        });
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open a socket and say hello; the link is then in `restoring` state.
    async fn establish(&self, timeout: Duration) -> Result<tokio::task::JoinHandle<()>, String> {
        let (out, reader) = open_socket(self, timeout).await?;
        let generation = {
            let mut st = self.state();
            st.generation += 1;
            st.out = Some(out);
            st.restoring = true;
            st.encoding = Encoding::Json;
            st.generation
        };
        let hello = HelloParams {
            versions: vec![PROTOCOL_VERSION],
            encodings: vec![Encoding::Bson, Encoding::Json],
            capabilities: [restfs_proto::CAP_PUSH, restfs_proto::CAP_CALLBACKS, restfs_proto::CAP_ACL, restfs_proto::CAP_RECLAIM]
                .map(String::from)
                .to_vec(),
            client: format!("restfs {}", env!("CARGO_PKG_VERSION")),
            client_id: Some(self.inner.client_id.clone()),
            token: self.inner.token.clone(),
        };
        let reply = tokio::time::timeout(timeout, self.call_now::<Hello>(hello))
            .await
            .map_err(|_| format!("server {} did not answer hello within {timeout:?}", self.inner.url.authority))?
            .map_err(|e| format!("handshake with {} failed: {e}", self.inner.url.authority))?;
        {
            let mut st = self.state();
            if st.generation == generation {
                st.encoding = reply.encoding;
            }
        }
        *self.inner.lease.lock().unwrap_or_else(|p| p.into_inner()) = reply.lease_ms.map(Duration::from_millis);
        *self.inner.server.lock().unwrap_or_else(|p| p.into_inner()) = reply.server;
        *self.inner.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = reply.capabilities;
        Ok(reader)
    }

    /// Leave `restoring`: send everything queued for this connection.
    fn finish_restore(&self) {
        let (out, generation) = {
            let mut st = self.state();
            st.restoring = false;
            st.failed = false;
            (st.out.clone(), st.generation)
        };
        let Some(out) = out else { return };
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<i64> = pending.iter().filter(|(_, p)| p.sent_on != generation).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        for id in ids {
            let call = pending.get_mut(&id).expect("listed above");
            call.sent_on = generation;
            call.sent_at = Instant::now();
            if out.try_send(frame_message(call.encoding, call.frame.clone())).is_err() {
                // The queue is full or the socket died: the next reconnect resends.
                call.sent_on = 0;
            }
        }
        drop(pending);
        self.inner.generation.send_replace(generation);
    }

    /// When the reader ends, reconnect.
    fn watch_connection(&self, reader: tokio::task::JoinHandle<()>) {
        let link = self.clone();
        tokio::spawn(async move {
            let _ = reader.await;
            link.reconnect().await;
        });
    }

    async fn reconnect(self) {
        {
            let mut st = self.state();
            st.out = None;
            st.restoring = true;
        }
        // The server no longer waits for this client's acknowledgements.
        self.inner.lease_until.store(0, Ordering::Release);
        let down_since = Instant::now();
        let mut backoff = Duration::from_millis(50);
        tracing::warn!("connection to {} lost; reconnecting", self.inner.url.authority);
        loop {
            if down_since.elapsed() > self.inner.reconnect_timeout && !self.state().failed {
                tracing::error!("server unreachable for {:?}: failing calls until it is back", self.inner.reconnect_timeout);
                self.state().failed = true;
                let failed: Vec<PendingCall> =
                    self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, c)| c).collect();
                drop(failed); // dropping the senders fails the callers
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let reader = match self.establish(Duration::from_secs(5)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("reconnect attempt failed: {e}");
                    continue;
                }
            };
            let hook = self.inner.restore.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(hook) = hook
                && let Err(e) = hook(self.clone()).await
            {
                tracing::warn!("restoring the session failed: {e}; retrying");
                reader.abort();
                self.state().out = None;
                continue;
            }
            self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!("reconnected to {} after {:?}", self.inner.url.authority, down_since.elapsed());
            self.finish_restore();
            self.watch_connection(reader);
            return;
        }
    }

    /// Set the work to redo after every reconnection.
    pub fn set_restore_hook(&self, hook: RestoreHook) {
        *self.inner.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Receive the change pushes of subscriptions made on this link.
    pub fn pushes(&self) -> mpsc::UnboundedReceiver<PushParams> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.pushes.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Counts the server's delegation recalls (`fs.recall`), to wait on.
    pub fn recalls(&self) -> watch::Receiver<u64> {
        self.inner.recalls.subscribe()
    }

    /// Connections re-established so far.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Did the server grant capability `cap` (`restfs_proto::CAP_*`)?
    pub fn server_has(&self, cap: &str) -> bool {
        self.inner.capabilities.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|c| c == cap)
    }

    pub fn server(&self) -> String {
        self.inner.server.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn route(&self, m: RawMessage) {
        let Ok(head) = m.head() else { return };
        match head.id {
            IdField::Valid(Id::Num(id)) => {
                let call = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(call) = call {
                    self.extend_lease(call.sent_at);
                    let _ = call.tx.send((m, self.inner.pushes_seen.load(Ordering::Acquire)));
                }
            }
            _ if head.method.as_deref() == Some(Recall::NAME) => {
                self.inner.recalls.send_modify(|n| *n += 1);
            }
            _ if head.method.as_deref() == Some(PushChanges::NAME) => match m.params::<PushParams>() {
                Ok(push) => {
                    let entries = (!push.reset).then(|| {
                        push.changes
                            .iter()
                            .filter_map(|c| match c {
                                Change::Entry { parent, name, ino, .. } => Some((*parent, name.0.clone(), *ino)),
                                Change::Attr { .. } => None,
                            })
                            .collect()
                    });
                    {
                        let mut recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
                        let n = self.inner.pushes_seen.load(Ordering::Acquire) + 1;
                        recent.push_back((n, entries));
                        if recent.len() > RECENT_PUSHES {
                            recent.pop_front();
                        }
                        self.inner.pushes_seen.store(n, Ordering::Release);
                    }
                    if let Some(tx) = self.inner.pushes.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        let _ = tx.send(push);
                    }
                }
                Err(e) => tracing::warn!("malformed push from the server: {e}"),
            },
            _ => match head.error {
                Some(e) => tracing::warn!("server error without id: {e}"),
                None => tracing::debug!("notification {:?} ignored", head.method),
            },
        }
    }

    /// Call `M` and await its result, riding out outages.
    pub async fn call<M: Method>(&self, params: M::Params) -> Result<M::Result, RpcError> {
        self.call_inner::<M>(params, false).await.0
    }

    /// Call `M`; also returns how many pushes had arrived when its reply
    /// did. Compared with [`Link::pushes_seen`] taken before the call, it
    /// tells whether any push came in between on the wire.
    pub async fn call_seen<M: Method>(&self, params: M::Params) -> (Result<M::Result, RpcError>, u64) {
        self.call_inner::<M>(params, false).await
    }

    /// Pushes received so far.
    pub fn pushes_seen(&self) -> u64 {
        self.inner.pushes_seen.load(Ordering::Acquire)
    }

    /// Did a push received after push number `before`, up to `at`, report
    /// a directory entry for which `hit(parent, name, ino)` holds? When in
    /// doubt (a reset, or pushes no longer remembered), yes.
    pub fn entries_crossed(&self, before: u64, at: u64, hit: impl Fn(Ino, &[u8], Option<Ino>) -> bool) -> bool {
        if at == before {
            return false;
        }
        if at < before {
            return true;
        }
        let recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.front().is_none_or(|(n, _)| *n > before + 1) {
            return true;
        }
        recent.iter().filter(|(n, _)| *n > before && *n <= at).any(|(_, entries)| match entries {
            None => true,
            Some(entries) => entries.iter().any(|(p, name, ino)| hit(*p, name, *ino)),
        })
    }

    /// Call `M` on the current connection even while it is being restored
    /// (for the restore hook itself).
    pub async fn call_now<M: Method>(&self, params: M::Params) -> Result<M::Result, RpcError> {
        self.call_inner::<M>(params, true).await.0
    }

    async fn call_inner<M: Method>(&self, params: M::Params, now: bool) -> (Result<M::Result, RpcError>, u64) {
        let seen = self.pushes_seen();
        match self.call_inner_seen::<M>(params, now).await {
            Ok((result, at)) => (result, at),
            Err(e) => (Err(e), seen.wrapping_sub(1)),
        }
    }

    async fn call_inner_seen<M: Method>(&self, params: M::Params, now: bool) -> Result<(Result<M::Result, RpcError>, u64), RpcError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(id, method = M::NAME, "call");
        let (tx, rx) = oneshot::channel();
        let (out, encoding, generation) = {
            let st = self.state();
            if st.failed && !now {
                return Err(timed_out(self.inner.reconnect_timeout));
            }
            let usable = st.out.clone().filter(|_| now || !st.restoring);
            (usable, st.encoding, st.generation)
        };
        let frame = encode_request(encoding, Some(&Id::Num(id)), M::NAME, &params);
        let sent_on = if out.is_some() { generation } else { 0 };
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, PendingCall { frame: frame.clone(), encoding, sent_on, sent_at: Instant::now(), tx });
        if let Some(out) = out
            && out.send(frame_message(encoding, frame)).await.is_err()
            && now
        {
            self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(lost());
        }
        let (reply, seen) = rx.await.map_err(|_| if self.state().failed { timed_out(self.inner.reconnect_timeout) } else { lost() })?;
        Ok((reply.result::<M::Result>(), seen))
    }

    /// Send `M` as a notification: no response, no waiting. Dropped while
    /// disconnected (the restore hook re-establishes what matters).
    pub async fn notify<M: Method>(&self, params: M::Params) -> Result<(), RpcError> {
        let (out, encoding) = {
            let st = self.state();
            (st.out.clone().filter(|_| !st.restoring), st.encoding)
        };
        let Some(out) = out else { return Ok(()) };
        let frame = encode_request(encoding, None, M::NAME, &params);
        out.send(frame_message(encoding, frame)).await.map_err(|_| lost())
    }
}

fn frame_message(encoding: Encoding, bytes: Vec<u8>) -> Message {
    match encoding {
        Encoding::Json => Message::text(String::from_utf8(bytes).expect("JSON encoder writes UTF-8")),
        Encoding::Bson => Message::binary(bytes),
    }
}

/// A random number from the OS (client ids need only be unique).
fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_le_bytes(buf)
}
