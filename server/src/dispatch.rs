//! Per-connection session and method dispatch.
//!
//! A [`Session`] remembers what a connection negotiated (`hello`), which
//! bucket it mounted and which inodes it holds open (released when the
//! connection ends). [`Session::handle`] turns one raw message into at most
//! one encoded response: notifications get none, and every failure — bad
//! envelope, unknown method, wrong params, filesystem error — gets a
//! JSON-RPC error object.

use crate::callbacks::Lease;
use crate::meta::{BucketId, MetaStore};
use crate::service::{BATCH_REPLIES, GC_MIN_AGE_SECS, Service};
use restfs_proto::methods::*;
use restfs_proto::rpc::{IdField, RawMessage, code, encode_response};
use restfs_proto::{
    Attr, BucketInfo, Bytes, DEFAULT_BLOCK_SIZE, DEFAULT_SEGMENT_BLOCKS, Encoding, Errno, Ino, Kind, MAX_BLOCK_SIZE, MAX_FRAME, Method,
    Name, PATH_MAX, PROTOCOL_VERSION, RpcError,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

type Outcome<T> = Result<T, RpcError>;

/// Frames a session sends on its own (pushes), in the connection's encoding.
pub type Outbox = tokio::sync::mpsc::Sender<(Encoding, Vec<u8>)>;

/// Bucket id for mutations no subscriber watches (bucket create/delete).
const NO_BUCKET: BucketId = -1;

/// Methods whose repetition is not harmless: a retry after a reconnection
/// is answered from the replay cache.
const REPLAYABLE: &[&str] = &[
    Mknod::NAME,
    Mkdir::NAME,
    Create::NAME,
    Symlink::NAME,
    Link::NAME,
    Unlink::NAME,
    Rmdir::NAME,
    Rename::NAME,
    SetXattr::NAME,
    RemoveXattr::NAME,
    BucketCreate::NAME,
    BucketDelete::NAME,
];

/// The attributes, now, of the inodes a change touched that still exist.
fn changed<const N: usize>(m: &dyn MetaStore, b: BucketId, touched: [Option<Ino>; N]) -> Changed {
    let mut inos: Vec<Ino> = touched.into_iter().flatten().collect();
    inos.dedup();
    Changed { attrs: inos.into_iter().filter_map(|ino| m.getattr(b, ino).ok()).collect() }
}

/// Most change-log sequence numbers sent in one push.
const PUSH_PAGE: u64 = 1000;

/// Numbers connections, for [`crate::delegation`].
static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Most batch tokens forgotten per `fs.batch` (a holder names one or a few).
const MAX_FORGET: usize = 1024;

/// Most inode numbers reserved in one `fs.delegate`.
const MAX_RESERVATION: u64 = 1 << 20;

pub struct Session {
    service: Arc<Service>,
    id: u64,
    bucket: Mutex<Option<(BucketId, BucketInfo)>>,
    /// Opens held by this connection, per inode.
    opens: Mutex<HashMap<(BucketId, Ino), u32>>,
    /// Opens of the connection this one replaced ([`Session::replace_by`]):
    /// the client registers them again as it restores its session, and
    /// those it does not are released when it subscribes.
    inherited: Mutex<HashMap<(BucketId, Ino), u32>>,
    outbox: Outbox,
    /// Encoding negotiated by `hello` (pushes use it).
    encoding: Mutex<Encoding>,
    pusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The client's stable id (from `hello`), for the replay cache.
    client_id: Mutex<Option<String>>,
    /// The client asked for callbacks (`hello`).
    wants_callbacks: std::sync::atomic::AtomicBool,
    /// The client marks its reclaims (`CAP_RECLAIM`).
    marks_reclaims: std::sync::atomic::AtomicBool,
    /// Its lease, once subscribed with callbacks.
    lease: Mutex<Option<(BucketId, Arc<Lease>)>>,
    /// `hello` presented the server's token (or it needs none).
    authenticated: std::sync::atomic::AtomicBool,
    /// The connection is gone: a lock taken by a request still running is dropped at once.
    closed: std::sync::atomic::AtomicBool,
    /// The client opened a new connection: this one is to close.
    replaced: tokio::sync::Notify,
    /// Where this connection's pushes stand, once subscribed. Held while a
    /// push is built and queued, so pushes go out whole and in order.
    pushes: tokio::sync::Mutex<Option<PushCursor>>,
}

/// Where a connection's pushes stand.
struct PushCursor {
    bucket: BucketId,
    /// Every change through this sequence number is queued to the client.
    through: u64,
    /// Highest change an acknowledgement was asked for.
    asked: u64,
}

/// Run `f` on the decoded params of `msg` and encode its outcome.
async fn run<M, F, Fut>(s: Arc<Session>, msg: &RawMessage, id: Option<restfs_proto::Id>, f: F) -> Vec<u8>
where
    M: Method,
    F: FnOnce(Arc<Session>, M::Params) -> Fut,
    Fut: Future<Output = Outcome<M::Result>>,
{
    let outcome = match msg.params::<M::Params>() {
        Ok(p) => f(s, p).await,
        Err(e) => Err(e),
    };
    encode_response(msg.encoding, id.as_ref(), &outcome)
}

fn bucket_name_ok(name: &str) -> Outcome<()> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RpcError::errno(Errno::EINVAL, format!("invalid bucket name {name:?}: use 1-63 of [A-Za-z0-9._-], not starting with '.'")))
    }
}

impl Session {
    pub fn new(service: Arc<Service>, outbox: Outbox) -> Arc<Session> {
        Arc::new(Session {
            service,
            id: SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            bucket: Mutex::new(None),
            opens: Mutex::new(HashMap::new()),
            inherited: Mutex::new(HashMap::new()),
            outbox,
            encoding: Mutex::new(Encoding::Json),
            pusher: Mutex::new(None),
            client_id: Mutex::new(None),
            wants_callbacks: Default::default(),
            marks_reclaims: Default::default(),
            lease: Mutex::new(None),
            authenticated: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
            replaced: tokio::sync::Notify::new(),
            pushes: tokio::sync::Mutex::new(None),
        })
    }

    /// This connection's lease, if it holds one.
    pub fn lease(&self) -> Option<Arc<Lease>> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, l)| l.clone())
    }

    /// A message arrived from the client.
    pub fn heard(&self) {
        if let Some(l) = self.lease() {
            self.service.callbacks.heard(&l);
        }
    }

    /// Before answering a change of bucket `b`: wait until the other
    /// clients holding leases on it have applied it (see [`crate::callbacks`]).
    /// Returns false, without waiting, when there are none.
    pub async fn await_callbacks(&self, b: BucketId) -> bool {
        let mine = self.lease();
        let others = self.service.callbacks.others(b, mine.as_ref());
        if others.is_empty() {
            return false;
        }
        match self.service.meta(move |m| m.changes_since(b, u64::MAX, 0)).await {
            Ok(log) => {
                self.service.callbacks.want(&others, log.seq);
                self.service.bump(b);
                self.service.callbacks.wait(&others, log.seq).await
            }
            Err(e) => {
                tracing::warn!("change sequence of bucket {b} unknown: {e}");
                self.service.bump(b);
            }
        }
        true
    }

    /// Before answering a change in bucket `b`: queue the pushes of every
    /// earlier change first, so no push older than the reply reaches the
    /// client after it (applied late, it would undo what the client learnt
    /// from the reply). Usually they are queued already; else they are sent
    /// from here, without the change being answered.
    pub async fn queue_earlier_pushes(&self, b: BucketId) {
        let Ok(log) = self.service.meta(move |m| m.changes_since(b, u64::MAX, 0)).await else { return };
        let earlier = log.seq.saturating_sub(1);
        while let Ok(Some(through)) = self.push_pending(Some(earlier)).await {
            if through >= earlier {
                return;
            }
        }
    }

    /// Answer one message; `None` for a notification.
    pub async fn handle(self: Arc<Self>, msg: RawMessage) -> Option<Vec<u8>> {
        let enc = msg.encoding;
        let invalid = |m: String| Some(encode_response::<()>(enc, None, &Err(RpcError::new(code::INVALID_REQUEST, m))));
        let head = match msg.head() {
            Ok(h) => h,
            Err(e) => return Some(encode_response::<()>(enc, None, &Err(e))),
        };
        if head.jsonrpc.as_deref() != Some("2.0") {
            return invalid("invalid request: \"jsonrpc\" must be \"2.0\"".into());
        }
        let id = match &head.id {
            IdField::Invalid => {
                return invalid("invalid request: id must be a string, an integer or null".into());
            }
            other => other.echo(),
        };
        let notification = head.id == IdField::Missing;
        let Some(method) = head.method.as_deref() else {
            return invalid("invalid request: \"method\" missing".into());
        };
        if method != Hello::NAME && self.service.token().is_some() && !self.authenticated.load(std::sync::atomic::Ordering::Acquire) {
            let refused = RpcError::errno(Errno::EACCES, "not authenticated: this server needs a token in hello");
            return (!notification).then(|| encode_response::<()>(enc, id.as_ref(), &Err(refused)));
        }
        let replay_key = match (self.client_id(), &id) {
            (Some(client), Some(id)) if REPLAYABLE.contains(&method) => Some((client, format!("{id:?}"))),
            _ => None,
        };
        if let Some((client, request)) = &replay_key
            && let Some(earlier) = self.service.replayed(client.clone(), request.clone()).await
        {
            if method == Create::NAME {
                self.reopen_replayed_create(&msg, &earlier);
            }
            return Some(earlier);
        }
        self.service.counters.count(method);
        let s = self.clone();
        let m = &msg;
        macro_rules! route {
            ($($M:ty => $f:ident),* $(,)?) => {
                match method {
                    $(<$M as Method>::NAME => run::<$M, _, _>(s, m, id, Session::$f).await,)*
                    other => encode_response::<()>(enc, id.as_ref(), &Err(RpcError::new(code::METHOD_NOT_FOUND, format!("method not found: {other}")))),
                }
            };
        }
        let response = route! {
            Hello => hello,
            BucketCreate => bucket_create,
            BucketList => bucket_list,
            BucketStat => bucket_stat,
            BucketDelete => bucket_delete,
            BucketMount => bucket_mount,
            Delegate => delegate,
            DelegateReturn => delegate_return,
            Recall => recall,
            Batch => batch,
            Lookup => lookup,
            GetAttr => getattr,
            SetAttr => setattr,
            Mknod => mknod,
            Mkdir => mkdir,
            Create => create,
            Symlink => symlink,
            Readlink => readlink,
            Link => link,
            Unlink => unlink,
            Rmdir => rmdir,
            Rename => rename,
            Readdir => readdir,
            Open => open,
            Release => release,
            SetXattr => setxattr,
            GetXattr => getxattr,
            ListXattr => listxattr,
            RemoveXattr => removexattr,
            Statfs => statfs,
            Sync => sync,
            SegmentGet => segment_get,
            SegmentCommit => segment_commit,
            BlockHas => block_has,
            BlockPut => block_put,
            BlockGet => block_get,
            Gc => gc,
            Subscribe => subscribe,
            Stats => stats,
            PushChanges => push_changes,
            PushAck => push_ack,
            Ping => ping,
            LockSet => lock_set,
            LockGet => lock_get,
        };
        if let Some((client, request)) = replay_key {
            self.service.remember(client, request, response.clone()).await;
        }
        if notification { None } else { Some(response) }
    }

    /// Stop pushing and release everything this connection held open.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.service.locks.drop_connection(self.id);
        if let Some(client) = self.client_id() {
            self.service.client_gone(&client, self);
        }
        if let Ok(b) = self.bucket_id() {
            self.service.delegations.unmounted(b, self.id);
        }
        if let Some(p) = self.pusher.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.abort();
        }
        if let Some((b, lease)) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.service.callbacks.drop_lease(b, &lease);
        }
        let opens: Vec<_> = self.opens.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        self.release_all(opens).await;
        self.release_inherited().await;
    }

    async fn release_all(&self, opens: Vec<((BucketId, Ino), u32)>) {
        for ((b, ino), n) in opens {
            for _ in 0..n {
                if let Err(e) = self.service.release(b, ino).await {
                    tracing::warn!("release of inode {ino} at disconnect: {e}");
                }
            }
        }
    }

    /// Release the inherited opens the client did not register again.
    async fn release_inherited(&self) {
        let left: Vec<_> = self.inherited.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        self.release_all(left).await;
    }

    /// The client reconnected on connection `new`, so it has given this
    /// one up (its side broke first): its locks and open files go over to
    /// the new one, so neither a lock nor an unlinked file held open is
    /// lost before the client has restored its session there; this one
    /// closes.
    fn replace_by(&self, new: &Session) {
        tracing::info!("closing a client's connection: it reconnected");
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.service.locks.move_connection(self.id, new.id);
        let mut opens: Vec<_> = self.opens.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        // Those it inherited itself, if the client gave up on it mid-restore.
        opens.extend(self.inherited.lock().unwrap_or_else(|p| p.into_inner()).drain());
        let mut inherited = new.inherited.lock().unwrap_or_else(|p| p.into_inner());
        for (key, n) in opens {
            *inherited.entry(key).or_insert(0) += n;
        }
        self.replaced.notify_one();
    }

    /// Wait until the client has replaced this connection.
    pub async fn replaced(&self) {
        self.replaced.notified().await
    }

    fn client_id(&self) -> Option<String> {
        self.client_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How the locks' marker names this connection's client.
    fn lock_client(&self) -> String {
        self.client_id().unwrap_or_else(|| crate::locks::UNNAMED.into())
    }

    fn bucket_id(&self) -> Outcome<BucketId> {
        match &*self.bucket.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((id, _)) => Ok(*id),
            None => Err(RpcError::errno(Errno::ENOTCONN, "no bucket mounted on this connection: call bucket.mount first")),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn crate::meta::MetaStore, BucketId) -> crate::error::Result<T> + Send + 'static,
    ) -> Outcome<T> {
        let b = self.bucket_id()?;
        Ok(self.service.meta(move |m| f(m, b)).await?)
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn crate::meta::MetaStore, BucketId) -> crate::error::Result<T> + Send + 'static,
    ) -> Outcome<T> {
        let b = self.bucket_id()?;
        Ok(self.service.mutate(b, move |m| f(m, b)).await?)
    }

    /// A create answered again from the replay cache registers its open
    /// again: the first registration went with the connection that carried
    /// it (or was inherited from it, and is taken over here).
    fn reopen_replayed_create(&self, msg: &RawMessage, earlier: &[u8]) {
        let Ok(p) = msg.params::<CreateParams>() else { return };
        if p.unregistered && self.lease().is_some() {
            return;
        }
        let answer = RawMessage { encoding: msg.encoding, bytes: earlier.to_vec() };
        if let (Ok(attr), Ok(b)) = (answer.result::<Attr>(), self.bucket_id()) {
            self.note_open(b, attr.ino);
        }
    }

    /// Register an open of `ino` by this connection (one it inherited, if any, is taken over).
    fn note_open(&self, b: BucketId, ino: Ino) {
        let taken_over = {
            let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
            match inherited.get_mut(&(b, ino)) {
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        inherited.remove(&(b, ino));
                    }
                    true
                }
                None => false,
            }
        };
        if !taken_over {
            self.service.register_open(b, ino);
        }
        *self.opens.lock().unwrap_or_else(|p| p.into_inner()).entry((b, ino)).or_insert(0) += 1;
    }

    fn is_open_fn(&self) -> impl Fn(Ino) -> bool + Send + 'static {
        let service = self.service.clone();
        let b = self.bucket_id().unwrap_or(-1);
        move |ino| service.is_open(b, ino)
    }

    // --- handshake and buckets ---

    async fn hello(self: Arc<Self>, p: HelloParams) -> Outcome<HelloResult> {
        if !p.versions.contains(&PROTOCOL_VERSION) {
            return Err(RpcError::errno(
                Errno::EPROTO,
                format!("no common protocol version: client speaks {:?}, server {PROTOCOL_VERSION}", p.versions),
            ));
        }
        if let Some(token) = self.service.token() {
            if !p.token.as_deref().is_some_and(|t| restfs_proto::credentials::same_secret(t, token)) {
                return Err(RpcError::errno(Errno::EACCES, "bad credentials: the server refused the token"));
            }
            self.authenticated.store(true, std::sync::atomic::Ordering::Release);
        }
        let encoding = p.encodings.first().copied().unwrap_or(Encoding::Json);
        *self.encoding.lock().unwrap_or_else(|p| p.into_inner()) = encoding;
        let client_id =
            p.client_id.filter(|c| !c.is_empty() && c.len() <= 128 && !c.chars().any(char::is_control) && c != crate::locks::UNNAMED);
        *self.client_id.lock().unwrap_or_else(|p| p.into_inner()) = client_id.clone();
        if let Some(old) = client_id.and_then(|c| self.service.client_connected(&c, &self)) {
            old.replace_by(&self);
        }
        let capabilities: Vec<String> = p
            .capabilities
            .into_iter()
            .filter(|c| {
                [restfs_proto::CAP_PUSH, restfs_proto::CAP_CALLBACKS, restfs_proto::CAP_ACL, restfs_proto::CAP_RECLAIM]
                    .contains(&c.as_str())
            })
            .collect();
        let callbacks = capabilities.iter().any(|c| c == restfs_proto::CAP_CALLBACKS);
        self.wants_callbacks.store(callbacks, std::sync::atomic::Ordering::Release);
        let marks = capabilities.iter().any(|c| c == restfs_proto::CAP_RECLAIM);
        self.marks_reclaims.store(marks, std::sync::atomic::Ordering::Release);
        Ok(HelloResult {
            version: PROTOCOL_VERSION,
            encoding,
            capabilities,
            server: format!("restfsd {}", env!("CARGO_PKG_VERSION")),
            max_frame: MAX_FRAME as u64,
            lease_ms: callbacks.then(|| crate::callbacks::LEASE.as_millis() as u64),
        })
    }

    async fn bucket_create(self: Arc<Self>, p: BucketCreateParams) -> Outcome<BucketInfo> {
        bucket_name_ok(&p.name)?;
        let block_size = p.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !block_size.is_power_of_two() || !(4096..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(RpcError::errno(Errno::EINVAL, format!("block size must be a power of two from 4096 to {MAX_BLOCK_SIZE}")));
        }
        let segment_blocks = p.segment_blocks.unwrap_or(DEFAULT_SEGMENT_BLOCKS);
        if !(1..=1024).contains(&segment_blocks) {
            return Err(RpcError::errno(Errno::EINVAL, "segment_blocks must be from 1 to 1024"));
        }
        Ok(self.service.mutate(NO_BUCKET, move |m| m.create_bucket(&p.name, block_size, segment_blocks)).await?)
    }

    async fn bucket_list(self: Arc<Self>, _: Empty) -> Outcome<BucketListResult> {
        Ok(BucketListResult { buckets: self.service.meta(|m| m.list_buckets()).await? })
    }

    async fn bucket_stat(self: Arc<Self>, p: BucketName) -> Outcome<BucketInfo> {
        Ok(self.service.meta(move |m| m.bucket(&p.name)).await?.1)
    }

    async fn bucket_delete(self: Arc<Self>, p: BucketDeleteParams) -> Outcome<Empty> {
        self.service.mutate(NO_BUCKET, move |m| m.delete_bucket(&p.name, p.force)).await?;
        Ok(Empty {})
    }

    async fn bucket_mount(self: Arc<Self>, p: BucketName) -> Outcome<MountResult> {
        let (id, info) = self.service.meta(move |m| m.bucket(&p.name)).await?;
        let root = self.service.meta(move |m| m.getattr(id, restfs_proto::ROOT_INO)).await?;
        let previous = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).replace((id, info.clone()));
        if let Some((old, _)) = previous {
            self.service.delegations.unmounted(old, self.id);
        }
        self.service.delegations.mounted(id, self.id);
        // Another connection's delegation ends before this one looks.
        self.service.delegations.recall(id, self.id, &self.service.callbacks).await;
        // What the holder sent may have changed the root.
        let root = if root.ino == restfs_proto::ROOT_INO {
            self.service.meta(move |m| m.getattr(id, restfs_proto::ROOT_INO)).await?
        } else {
            root
        };
        Ok(MountResult { bucket: info, root })
    }

    // --- namespace ---

    async fn lookup(self: Arc<Self>, p: EntryParams) -> Outcome<Attr> {
        self.read(move |m, b| m.lookup(b, p.parent, p.name.as_bytes())).await
    }

    async fn getattr(self: Arc<Self>, p: InoParams) -> Outcome<Attr> {
        self.read(move |m, b| m.getattr(b, p.ino)).await
    }

    async fn setattr(self: Arc<Self>, p: SetAttrParams) -> Outcome<Attr> {
        self.write(move |m, b| m.setattr(b, &p)).await
    }

    async fn mknod(self: Arc<Self>, p: NewNodeParams) -> Outcome<Attr> {
        if matches!(p.kind, Kind::Dir | Kind::Symlink) {
            return Err(RpcError::errno(Errno::EINVAL, "use fs.mkdir or fs.symlink for directories and symlinks"));
        }
        self.write(move |m, b| m.mknod(b, &p, None)).await
    }

    async fn mkdir(self: Arc<Self>, mut p: NewNodeParams) -> Outcome<Attr> {
        p.kind = Kind::Dir;
        self.write(move |m, b| m.mknod(b, &p, None)).await
    }

    async fn create(self: Arc<Self>, p: CreateParams) -> Outcome<Attr> {
        let node = NewNodeParams {
            parent: p.parent,
            name: p.name,
            kind: Kind::File,
            mode: p.mode,
            uid: p.uid,
            gid: p.gid,
            rdev: 0,
            ino: None,
            umask: p.umask,
        };
        let attr = self.write(move |m, b| m.mknod(b, &node, None)).await?;
        if !(p.unregistered && self.lease().is_some()) {
            self.note_open(self.bucket_id()?, attr.ino);
        }
        Ok(attr)
    }

    async fn symlink(self: Arc<Self>, p: SymlinkParams) -> Outcome<Attr> {
        if p.target.0.is_empty() || p.target.0.len() > PATH_MAX || p.target.0.contains(&0) {
            return Err(RpcError::errno(
                if p.target.0.len() > PATH_MAX { Errno::ENAMETOOLONG } else { Errno::EINVAL },
                "invalid symlink target",
            ));
        }
        let node = NewNodeParams {
            parent: p.parent,
            name: p.name,
            kind: Kind::Symlink,
            mode: 0o777,
            uid: p.uid,
            gid: p.gid,
            rdev: 0,
            ino: None,
            umask: 0,
        };
        self.write(move |m, b| m.mknod(b, &node, Some(&p.target.0))).await
    }

    async fn readlink(self: Arc<Self>, p: InoParams) -> Outcome<ReadlinkResult> {
        Ok(ReadlinkResult { target: Name(self.read(move |m, b| m.readlink(b, p.ino)).await?) })
    }

    async fn link(self: Arc<Self>, p: LinkParams) -> Outcome<Attr> {
        self.write(move |m, b| m.link(b, p.ino, p.parent, p.name.as_bytes())).await
    }

    async fn unlink(self: Arc<Self>, p: EntryParams) -> Outcome<Changed> {
        let (is_open, deferred) = self.is_open_or_deferred();
        let (victim, changed) = self
            .write(move |m, b| {
                let victim = m.lookup(b, p.parent, p.name.as_bytes()).ok().map(|a| a.ino);
                m.unlink(b, p.parent, p.name.as_bytes(), &is_open)?;
                Ok((victim, changed(m, b, [Some(p.parent), victim])))
            })
            .await?;
        if deferred {
            self.purge_after_callbacks(victim).await?;
        }
        Ok(changed)
    }

    /// Is an inode held open? When other clients hold leases, every inode
    /// counts as open (the second value): they may hold it open without
    /// the server knowing, and say so when they acknowledge its unlinking.
    fn is_open_or_deferred(&self) -> (impl Fn(Ino) -> bool + Send + 'static, bool) {
        let is_open = self.is_open_fn();
        let deferred = self.bucket_id().is_ok_and(|b| !self.service.callbacks.others(b, self.lease().as_ref()).is_empty());
        (move |ino| deferred || is_open(ino), deferred)
    }

    /// Once the other clients acknowledged an unlinking (and registered
    /// their opens of `victim`), purge it unless open.
    async fn purge_after_callbacks(&self, victim: Option<Ino>) -> Outcome<()> {
        let b = self.bucket_id()?;
        self.await_callbacks(b).await;
        if let Some(ino) = victim {
            self.service.purge_unless_open(b, ino).await?;
        }
        Ok(())
    }

    async fn rmdir(self: Arc<Self>, p: EntryParams) -> Outcome<Changed> {
        self.write(move |m, b| {
            m.rmdir(b, p.parent, p.name.as_bytes())?;
            Ok(changed(m, b, [Some(p.parent)]))
        })
        .await
    }

    async fn rename(self: Arc<Self>, p: RenameParams) -> Outcome<Changed> {
        let (is_open, deferred) = self.is_open_or_deferred();
        let (victim, changed) = self
            .write(move |m, b| {
                let moving = m.lookup(b, p.parent, p.name.as_bytes()).ok().map(|a| a.ino);
                let victim = if p.exchange { None } else { m.lookup(b, p.new_parent, p.new_name.as_bytes()).ok().map(|a| a.ino) };
                m.rename(b, &p, &is_open)?;
                let touched = [Some(p.parent), (p.new_parent != p.parent).then_some(p.new_parent), moving, victim];
                Ok((victim, changed(m, b, touched)))
            })
            .await?;
        if deferred {
            self.purge_after_callbacks(victim).await?;
        }
        Ok(changed)
    }

    async fn readdir(self: Arc<Self>, p: ReaddirParams) -> Outcome<ReaddirResult> {
        let l = self.read(move |m, b| m.readdir(b, p.ino, p.after.as_ref().map(|n| n.as_bytes()), p.limit)).await?;
        Ok(ReaddirResult { parent: l.parent, entries: l.entries, more: l.more })
    }

    async fn open(self: Arc<Self>, p: InoParams) -> Outcome<Attr> {
        let attr = self.read(move |m, b| m.getattr(b, p.ino)).await?;
        self.note_open(self.bucket_id()?, attr.ino);
        Ok(attr)
    }

    async fn release(self: Arc<Self>, p: InoParams) -> Outcome<Empty> {
        let b = self.bucket_id()?;
        let held = {
            let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
            match opens.get_mut(&(b, p.ino)) {
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        opens.remove(&(b, p.ino));
                    }
                    true
                }
                None => false,
            }
        };
        if !held {
            return Err(RpcError::errno(Errno::EBADF, format!("inode {} is not open on this connection", p.ino)));
        }
        self.service.release(b, p.ino).await?;
        Ok(Empty {})
    }

    // --- xattrs, statfs, sync ---

    async fn setxattr(self: Arc<Self>, p: SetXattrParams) -> Outcome<Empty> {
        self.write(move |m, b| m.setxattr(b, p.ino, p.name.as_bytes(), &p.value.0, p.mode)).await?;
        Ok(Empty {})
    }

    async fn getxattr(self: Arc<Self>, p: XattrParams) -> Outcome<XattrValue> {
        Ok(XattrValue { value: Bytes(self.read(move |m, b| m.getxattr(b, p.ino, p.name.as_bytes())).await?) })
    }

    async fn listxattr(self: Arc<Self>, p: InoParams) -> Outcome<XattrNames> {
        Ok(XattrNames { names: self.read(move |m, b| m.listxattr(b, p.ino)).await?.into_iter().map(Name).collect() })
    }

    async fn removexattr(self: Arc<Self>, p: XattrParams) -> Outcome<Empty> {
        self.write(move |m, b| m.removexattr(b, p.ino, p.name.as_bytes())).await?;
        Ok(Empty {})
    }

    async fn statfs(self: Arc<Self>, _: Empty) -> Outcome<StatfsResult> {
        let b = self.bucket_id()?;
        let objects = self.service.meta(move |m| m.bucket_by_id(b)).await?.objects;
        let (free, total) = self.service.space().await?;
        const BSIZE: u64 = 4096;
        const FILES: u64 = 1 << 32;
        Ok(StatfsResult {
            bsize: BSIZE as u32,
            blocks: total / BSIZE,
            bfree: free / BSIZE,
            bavail: free / BSIZE,
            files: FILES,
            ffree: FILES.saturating_sub(objects),
            namelen: restfs_proto::NAME_MAX as u32,
        })
    }

    async fn sync(self: Arc<Self>, _: Empty) -> Outcome<Empty> {
        self.service.sync().await?;
        Ok(Empty {})
    }

    // --- data ---

    async fn segment_get(self: Arc<Self>, p: SegmentGetParams) -> Outcome<SegmentGetResult> {
        let b = self.bucket_id()?;
        let per = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, i)| i.segment_blocks as u64).unwrap_or(1);
        let (version, blocks) = self.service.meta(move |m| m.block_map(b, p.ino, p.segment.saturating_mul(per), per)).await?;
        Ok(SegmentGetResult { version, blocks })
    }

    async fn segment_commit(self: Arc<Self>, mut p: SegmentCommitParams) -> Outcome<Attr> {
        let blocks = std::mem::take(&mut p.blocks);
        if !blocks.is_empty() {
            self.service.put_blocks(blocks.into_iter().map(|b| (b.hash, b.data.0)).collect()).await?;
        }
        self.write(move |m, b| m.commit(b, p.ino, p.size, &p.slots, p.mtime)).await
    }

    async fn block_has(self: Arc<Self>, p: BlockHasParams) -> Outcome<BlockHasResult> {
        Ok(BlockHasResult { present: self.service.meta(move |m| m.has_blocks(&p.hashes)).await? })
    }

    async fn block_put(self: Arc<Self>, p: BlockPutParams) -> Outcome<Empty> {
        self.service.put_blocks(p.blocks.into_iter().map(|b| (b.hash, b.data.0)).collect()).await?;
        Ok(Empty {})
    }

    async fn block_get(self: Arc<Self>, p: BlockGetParams) -> Outcome<BlockGetResult> {
        Ok(BlockGetResult { data: Bytes(self.service.get_block(p.hash).await?) })
    }

    async fn gc(self: Arc<Self>, p: GcParams) -> Outcome<GcResult> {
        let (blocks_removed, bytes_removed) = self.service.collect_garbage(p.min_age_secs.unwrap_or(GC_MIN_AGE_SECS)).await?;
        Ok(GcResult { blocks_removed, bytes_removed })
    }
}

/// Run `f` with the store stamping its changes `at` (the store runs in
/// place, inside the polls of `f`).
async fn stamped<F: Future>(at: restfs_proto::Timespec, f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| crate::meta::stamped_at(at, || f.as_mut().poll(cx))).await
}

/// Turn logged changes into pushes carrying the state they left behind.
fn enrich(m: &dyn crate::meta::MetaStore, b: BucketId, log: &crate::meta::ChangeLog) -> crate::error::Result<Vec<Change>> {
    use crate::meta::Changed;
    // Only the newest change per subject matters: the push carries current state.
    let mut latest: HashMap<&Changed, u64> = HashMap::new();
    for (seq, what) in &log.changes {
        latest.insert(what, *seq);
    }
    let mut subjects: Vec<(&Changed, u64)> = latest.into_iter().collect();
    subjects.sort_by_key(|(_, seq)| *seq);
    let gone = |e: &crate::error::Error| e.errno() == Errno::ENOENT || e.errno() == Errno::ENOTDIR;
    let mut out = Vec::with_capacity(subjects.len());
    for (what, seq) in subjects {
        out.push(match what {
            Changed::Attr(ino) => match m.getattr(b, *ino) {
                Ok(a) => Change::Attr { seq, ino: *ino, attr: Some(a) },
                Err(e) if gone(&e) => Change::Attr { seq, ino: *ino, attr: None },
                Err(e) => return Err(e),
            },
            Changed::Entry(parent, name) => match m.lookup(b, *parent, name) {
                Ok(a) => Change::Entry { seq, parent: *parent, name: Name(name.clone()), ino: Some(a.ino) },
                Err(e) if gone(&e) => Change::Entry { seq, parent: *parent, name: Name(name.clone()), ino: None },
                Err(e) => return Err(e),
            },
        });
    }
    Ok(out)
}

impl Session {
    async fn subscribe(self: Arc<Self>, p: SubscribeParams) -> Outcome<SubscribeResult> {
        let b = self.bucket_id()?;
        let log = self.service.meta(move |m| m.changes_since(b, 0, 0)).await?;
        let reset = p.since.is_some_and(|s| s < log.log_start || s > log.seq);
        let cursor = match p.since {
            Some(s) if !reset => s,
            _ => log.seq,
        };
        // The client has restored its session: what it did not open again
        // is closed, a lease later (the requests it sends again once
        // subscribed, such as a create whose answer was lost, take theirs
        // over meanwhile).
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(crate::callbacks::LEASE).await;
            me.release_inherited().await;
        });
        if let Some(client) = self.client_id() {
            self.service.locks.restored(&client);
        }
        let me = self.clone();
        let bump = self.service.watch(b);
        *self.pushes.lock().await = Some(PushCursor { bucket: b, through: cursor, asked: 0 });
        let task = tokio::spawn(async move { me.push_loop(bump).await });
        if let Some(old) = self.pusher.lock().unwrap_or_else(|p| p.into_inner()).replace(task) {
            old.abort();
        }
        if self.wants_callbacks.load(std::sync::atomic::Ordering::Acquire) {
            let lease = self.service.callbacks.grant(b, cursor);
            if let Some((ob, old)) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).replace((b, lease)) {
                self.service.callbacks.drop_lease(ob, &old);
            }
        }
        Ok(SubscribeResult { seq: log.seq, reset })
    }

    /// Send every change not pushed yet, then every new one, until the connection ends.
    async fn push_loop(self: Arc<Self>, mut bump: tokio::sync::watch::Receiver<u64>) {
        loop {
            bump.mark_unchanged();
            match self.push_pending(None).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(()) => return,
            }
            if bump.changed().await.is_err() {
                return;
            }
        }
    }

    /// Queue one push of the changes not pushed yet (through `upto` at most).
    /// Returns how far pushes now go, or `None` when there was nothing to
    /// send; `Err` when the connection or the log is gone.
    async fn push_pending(&self, upto: Option<u64>) -> Result<Option<u64>, ()> {
        let mut guard = self.pushes.lock().await;
        let Some(state) = guard.as_mut() else { return Ok(None) };
        let (b, cursor) = (state.bucket, state.through);
        if upto.is_some_and(|u| u <= cursor) {
            return Ok(Some(cursor));
        }
        let limit = upto.map_or(PUSH_PAGE, |u| (u - cursor).min(PUSH_PAGE));
        // A delegation holder made every change itself: it gets only the sequence.
        let own = self.service.delegations.holds(b, self.id);
        let page = self
            .service
            .meta(move |m| {
                let log = m.changes_since(b, cursor, limit)?;
                let changes = if cursor < log.log_start || own { Vec::new() } else { enrich(m, b, &log)? };
                Ok((log, changes))
            })
            .await;
        let (log, changes) = page.map_err(|e| tracing::warn!("change push stopped: {e}"))?;
        let reset = cursor < log.log_start;
        let through = if reset { log.seq } else { log.through };
        let wanted = self.lease().and_then(|l| l.ack_wanted());
        // A change already pushed may come to need an acknowledgement:
        // ask with an empty push (once per change waited for).
        let ask = wanted.is_some_and(|w| w > state.asked && w <= through.max(cursor));
        if !(through > cursor || reset || ask) {
            return Ok(None);
        }
        let enc = *self.encoding.lock().unwrap_or_else(|p| p.into_inner());
        let push = PushParams { through: through.max(cursor), reset, changes, ack: wanted.is_some() };
        if let Some(w) = wanted {
            state.asked = state.asked.max(w.min(push.through));
        }
        let frame = restfs_proto::rpc::encode_request(enc, None, PushChanges::NAME, &push);
        self.outbox.send((enc, frame)).await.map_err(|_| ())?;
        state.through = through.max(cursor);
        Ok(Some(state.through))
    }

    async fn stats(self: Arc<Self>, _: Empty) -> Outcome<StatsResult> {
        Ok(StatsResult { counters: self.service.counters.snapshot() })
    }

    async fn push_ack(self: Arc<Self>, p: PushAckParams) -> Outcome<Empty> {
        match self.lease() {
            Some(l) => {
                let b = self.bucket_id()?;
                for ino in p.holding {
                    self.note_open(b, ino);
                }
                l.ack(p.through);
                Ok(Empty {})
            }
            None => Err(RpcError::errno(Errno::EINVAL, "push.ack without a callbacks subscription")),
        }
    }

    // --- delegation (see crate::delegation) ---

    async fn delegate(self: Arc<Self>, p: DelegateParams) -> Outcome<DelegateResult> {
        let b = self.bucket_id()?;
        let Some(lease) = self.lease() else {
            return Err(RpcError::errno(Errno::EINVAL, "fs.delegate needs a callbacks subscription (bucket.subscribe)"));
        };
        let refused = DelegateResult { granted: false, first: 0, count: 0 };
        // Just after a restart the locks held before come back one holder
        // at a time: a delegated mount would answer lock requests without them.
        if self.service.locks.in_grace() {
            return Ok(refused);
        }
        if self.service.delegations.holds(b, self.id) {
            let count = p.inos.min(MAX_RESERVATION);
            let first = self.reserve(b, count).await?;
            return Ok(DelegateResult { granted: true, first, count });
        }
        // Others' changes are pushed in full before the grant: after it,
        // this connection's pushes carry only sequence numbers.
        let seq = self.service.meta(move |m| m.changes_since(b, u64::MAX, 0)).await?.seq;
        while let Ok(Some(through)) = self.push_pending(Some(seq)).await {
            if through >= seq {
                break;
            }
        }
        let pushes = self.pushes.lock().await;
        if pushes.as_ref().is_none_or(|c| c.through < seq) {
            return Ok(refused);
        }
        let (outbox, enc) = (self.outbox.clone(), *self.encoding.lock().unwrap_or_else(|p| p.into_inner()));
        let recall = Box::new(move || {
            let frame = restfs_proto::rpc::encode_request(enc, None, Recall::NAME, &Empty {});
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.send((enc, frame)).await });
        });
        if !self.service.delegations.grant(b, self.id, lease, recall) {
            return Ok(refused);
        }
        // Its holder answers locks itself: a restart waits for it to take them again.
        self.service.locks.delegated(self.id, &self.lock_client());
        drop(pushes);
        let first = self.reserve(b, p.inos.min(MAX_RESERVATION)).await?;
        Ok(DelegateResult { granted: true, first, count: p.inos.min(MAX_RESERVATION) })
    }

    /// Reserve inode numbers, committed at once: a server crash must not
    /// hand them out again.
    async fn reserve(&self, b: BucketId, count: u64) -> Outcome<Ino> {
        let first = self.service.mutate(b, move |m| m.reserve_inos(b, count)).await?;
        self.service.meta(|m| m.commit_group()).await?;
        Ok(first)
    }

    async fn delegate_return(self: Arc<Self>, _: Empty) -> Outcome<Empty> {
        let b = self.bucket_id()?;
        // Under the push lock: every change so far is the holder's own and
        // is skipped; later ones (others', once it is returned) are pushed.
        let mut pushes = self.pushes.lock().await;
        if let Some(state) = pushes.as_mut() {
            let seq = self.service.meta(move |m| m.changes_since(b, u64::MAX, 0)).await?.seq;
            if seq > state.through {
                let enc = *self.encoding.lock().unwrap_or_else(|p| p.into_inner());
                let push = PushParams { through: seq, reset: false, changes: Vec::new(), ack: false };
                let frame = restfs_proto::rpc::encode_request(enc, None, PushChanges::NAME, &push);
                self.outbox.send((enc, frame)).await.map_err(|_| RpcError::errno(Errno::ENOTCONN, "connection closing"))?;
                state.through = seq;
            }
        }
        self.service.delegations.give_back(b, self.id);
        drop(pushes);
        Ok(Empty {})
    }

    async fn recall(self: Arc<Self>, _: Empty) -> Outcome<Empty> {
        Err(RpcError::errno(Errno::EINVAL, "fs.recall is sent by the server, not to it"))
    }

    /// Apply a holder's queued changes in order, each stamped with its time.
    async fn batch(self: Arc<Self>, mut p: BatchParams) -> Outcome<BatchResult> {
        if !p.forget.is_empty() {
            p.forget.truncate(MAX_FORGET);
            self.service.forget_batches(std::mem::take(&mut p.forget)).await;
        }
        // Applied once per token (see `BatchParams::token`).
        if let Some(token) = &p.token
            && let Some(earlier) = self.service.replayed(BATCH_REPLIES.into(), token.clone()).await
            && let Ok(result) = serde_json::from_slice::<BatchResult>(&earlier)
        {
            return Ok(result);
        }
        let mut outcomes = Vec::with_capacity(p.ops.len());
        for op in p.ops {
            let s = self.clone();
            let done: Outcome<Option<Attr>> = match op {
                BatchOp::Mknod { at, node } if matches!(node.kind, Kind::File | Kind::Dir) => {
                    stamped(at, s.write(move |m, b| m.mknod(b, &node, None))).await.map(Some)
                }
                BatchOp::Mknod { .. } => Err(RpcError::errno(Errno::EINVAL, "a batch creates files and directories only")),
                BatchOp::Unlink { at, entry } => stamped(at, s.unlink(entry)).await.map(|_| None),
                BatchOp::Rmdir { at, entry } => stamped(at, s.rmdir(entry)).await.map(|_| None),
                BatchOp::Rename { at, rename } => stamped(at, s.rename(rename)).await.map(|_| None),
                BatchOp::Link { at, link } => stamped(at, s.link(link)).await.map(|_| None),
                BatchOp::Commit { at, commit } => stamped(at, s.segment_commit(commit)).await.map(Some),
                BatchOp::SetAttr { attr, .. } if attr.size.is_some() => {
                    Err(RpcError::errno(Errno::EINVAL, "a batch changes no size: use fs.setattr"))
                }
                BatchOp::SetAttr { at, attr } => stamped(at, s.setattr(attr)).await.map(Some),
            };
            outcomes.push(match done {
                Ok(attr) => BatchOutcome { attr, error: None },
                Err(e) => BatchOutcome { attr: None, error: Some(e) },
            });
        }
        let result = BatchResult { outcomes };
        if let Some(token) = p.token {
            let remembered = serde_json::to_vec(&result).map_err(|e| RpcError::errno(Errno::EIO, e.to_string()))?;
            self.service.remember(BATCH_REPLIES.into(), token, remembered).await;
        }
        Ok(result)
    }

    async fn ping(self: Arc<Self>, _: Empty) -> Outcome<Empty> {
        Ok(Empty {})
    }

    fn lock_request(&self, p: LockParams) -> Outcome<crate::locks::Request> {
        if p.start > p.end {
            return Err(RpcError::errno(Errno::EINVAL, format!("lock range {}..={} is empty", p.start, p.end)));
        }
        let bucket = self.bucket_id()?;
        Ok(crate::locks::Request {
            bucket,
            ino: p.ino,
            conn: self.id,
            owner: p.owner,
            start: p.start,
            end: p.end,
            kind: p.kind,
            pid: p.pid,
            // An older client's reclaims are not marked: all its requests count as such.
            reclaim: p.reclaim || !self.marks_reclaims.load(std::sync::atomic::Ordering::Acquire),
            client: self.lock_client(),
        })
    }

    async fn lock_set(self: Arc<Self>, p: LockParams) -> Outcome<Empty> {
        // The inode is not looked up: under the delegation, the holder may
        // lock a file whose creation is still in its queue.
        let r = self.lock_request(p)?;
        let taken = self.service.locks.set(&r);
        // After `close` dropped this connection's locks, or before: either
        // way none outlives it.
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            self.service.locks.drop_connection(self.id);
        }
        taken.map(|()| Empty {}).map_err(|why| RpcError::errno(Errno::EAGAIN, why))
    }

    async fn lock_get(self: Arc<Self>, p: LockParams) -> Outcome<LockGetResult> {
        // Until the locks held before the restart are back, the answer could
        // miss one: a client that knows (`CAP_RECLAIM`) asks again.
        if self.marks_reclaims.load(std::sync::atomic::Ordering::Acquire) && self.service.locks.in_grace() {
            return Err(RpcError::errno(Errno::EAGAIN, crate::locks::IN_GRACE));
        }
        let r = self.lock_request(p)?;
        Ok(LockGetResult { conflict: self.service.locks.conflict(&r) })
    }

    async fn push_changes(self: Arc<Self>, _: PushParams) -> Outcome<Empty> {
        Err(RpcError::errno(Errno::EINVAL, "push.changes is sent by the server, not to it"))
    }
}
