//! The thin fuser adapter: one kernel request in, one core call, one reply
//! out. Each request runs as a task on the tokio runtime so the fuser
//! threads never wait on the network. Errno mapping is [`reply_error`].

use crate::fs::{Ctx, Fs, FsError, SetAttr};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use restfs_proto::methods::XattrMode;
use restfs_proto::{Attr, Kind, SetTime, Timespec};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

/// How long the kernel may trust attributes and entries without asking.
/// Long, because the server pushes every change (and a reconnecting
/// client catches up on what it missed), so caches are invalidated when
/// they go stale rather than when a timer runs out.
const TTL: Duration = Duration::from_secs(60);

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: Handle,
    view: AttrView,
    /// Ask for the kernel's writeback cache.
    writeback: bool,
}

/// How the adapter presents the bucket (from mount options).
#[derive(Debug, Clone, Copy, Default)]
pub struct Presentation {
    /// Show every file as owned by this user (`-o uid=`).
    pub uid: Option<u32>,
    /// Show every file as owned by this group (`-o gid=`).
    pub gid: Option<u32>,
    /// Permission bits hidden from every file (`-o umask=`).
    pub umask: u32,
    /// Ask for the kernel's writeback cache (`-o writeback`).
    pub writeback: bool,
}

/// How attributes are shown to the kernel, which checks permissions against
/// them: the bucket's block size, and the owner and mode overrides.
#[derive(Debug, Clone, Copy)]
struct AttrView {
    blksize: u32,
    uid: Option<u32>,
    gid: Option<u32>,
    umask: u32,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: Handle, p: Presentation) -> FuseAdapter {
        let view = AttrView { blksize: fs.bucket.block_size, uid: p.uid, gid: p.gid, umask: p.umask & 0o7777 };
        FuseAdapter { fs, rt, view, writeback: p.writeback }
    }

    /// Run `job` with a clone of the core: first right here, on the fuser
    /// thread, and only if it has to wait (on the server, a lock, a timer)
    /// as a task on the runtime. Requests answered from the caches thus
    /// cost no thread hand-off, which was most of their price.
    fn run<F, Fut>(&self, op: &'static str, job: F)
    where
        F: FnOnce(Arc<Fs>, AttrView) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let _runtime = self.rt.enter();
        let started = std::time::Instant::now();
        let mut job = Box::pin(job(self.fs.clone(), self.view));
        // A wake-up lost to the no-op waker does no harm: a spawned task is
        // polled at once, and from then on with the runtime's waker.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if job.as_mut().poll(&mut cx).is_ready() {
            self.fs.metrics().request(op, started.elapsed(), false);
            return;
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            job.await;
            fs.metrics().request(op, started.elapsed(), true);
        });
    }
}

/// The kernel's caches, invalidated through fuser's notifier. Queued
/// invalidations run on a dedicated thread, never inside a request handler:
/// an entry invalidation takes the directory's lock, which a handler may hold.
pub struct KernelNotifier {
    notifier: fuser::Notifier,
    queue: std::sync::mpsc::Sender<Inval>,
}

enum Inval {
    Inode(u64),
    Entry(u64, Vec<u8>),
    /// Run once the invalidations queued before it are done.
    Then(Box<dyn FnOnce() + Send>),
}

impl KernelNotifier {
    pub fn new(notifier: fuser::Notifier) -> KernelNotifier {
        let (queue, rx) = std::sync::mpsc::channel::<Inval>();
        let worker = notifier.clone();
        std::thread::Builder::new()
            .name("restfs-inval".into())
            .spawn(move || {
                for inval in rx {
                    let r = match inval {
                        Inval::Inode(ino) => worker.inval_inode(INodeNo(ino), 0, 0),
                        Inval::Entry(parent, name) => worker.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)),
                        Inval::Then(f) => {
                            f();
                            Ok(())
                        }
                    };
                    // ENOENT: the kernel does not have it cached, nothing to do.
                    if let Err(e) = r
                        && e.raw_os_error() != Some(libc::ENOENT)
                    {
                        tracing::debug!("kernel invalidation failed: {e}");
                    }
                }
            })
            .expect("spawn the invalidation thread");
        KernelNotifier { notifier, queue }
    }
}

impl crate::fs::KernelCache for KernelNotifier {
    fn invalidate_attrs(&self, ino: u64) {
        // A negative offset invalidates attributes only: no page lock is taken,
        // so this is safe while a request on the inode is in flight.
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), -1, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!("attribute invalidation of inode {ino}: {e}");
        }
    }

    fn invalidate_inode(&self, ino: u64) {
        let _ = self.queue.send(Inval::Inode(ino));
    }

    fn invalidate_entry(&self, parent: u64, name: &[u8]) {
        let _ = self.queue.send(Inval::Entry(parent, name.to_vec()));
    }

    fn after_invalidations(&self, then: Box<dyn FnOnce() + Send>) {
        if let Err(std::sync::mpsc::SendError(Inval::Then(then))) = self.queue.send(Inval::Then(then)) {
            then();
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr, view: AttrView) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime.to_system_time(),
        mtime: a.mtime.to_system_time(),
        ctime: a.ctime.to_system_time(),
        crtime: a.ctime.to_system_time(),
        kind: file_type(a.kind),
        perm: (a.mode & !view.umask) as u16,
        nlink: a.nlink,
        uid: view.uid.unwrap_or(a.uid),
        gid: view.gid.unwrap_or(a.gid),
        rdev: a.rdev,
        blksize: view.blksize,
        flags: 0,
    }
}

/// What an entry reply says of an absent name (inode 0).
fn absent_entry() -> FileAttr {
    let t = SystemTime::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    if e.errno.0 == libc::EIO {
        tracing::warn!("I/O error: {e}");
    } else {
        tracing::debug!("{e}");
    }
    Errno::from_i32(e.errno.0)
}

/// Reply with the errno of `e`.
macro_rules! reply_error {
    ($reply:expr, $e:expr) => {
        $reply.error(errno(&$e))
    };
}

fn ctx(req: &Request) -> Ctx {
    Ctx { uid: req.uid(), gid: req.gid(), umask: 0 }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(Timespec::from(st)),
    })
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

fn entry(reply: ReplyEntry, r: crate::fs::Result<Attr>, view: AttrView) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a, view), Generation(0)),
        Err(e) => reply_error!(reply, e),
    }
}

fn empty(reply: ReplyEmpty, r: crate::fs::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply_error!(reply, e),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Capabilities one at a time: one unsupported bit would reject a set.
        // HANDLE_KILLPRIV_V2: writes by unprivileged processes carry a flag
        // and the daemon drops set-ID bits (`Fs::kill_suidgid`); in return
        // the kernel stops asking for `security.capability` before every
        // write (SB_NOSEC: once per inode found without it).
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // Locks go to the server, so they hold across mounts.
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::debug!("kernel lacks {missing:?}");
            }
        }
        // POSIX ACLs: the kernel enforces and caches them; the server ties
        // them to the mode and passes default ACLs on, which take the place
        // of the umask (so the server applies the umask). Both, or neither.
        if self.fs.acls() && config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok() {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_POSIX_ACL) {
                tracing::warn!("kernel lacks {missing:?}: POSIX ACLs are not enforced");
            }
        } else {
            tracing::warn!(
                "POSIX ACLs are off: the server does not keep them (restfsd too old?), or the kernel cannot leave the umask to it"
            );
        }
        // Writes then land in the page cache; the kernel sends them on close
        // (before FLUSH, which commits), fsync, or under memory pressure.
        if self.writeback
            && let Err(missing) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
        {
            tracing::warn!("kernel lacks {missing:?}: mounted without the writeback cache");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = bytes(name);
        self.run("lookup", |fs, bs| async move {
            match fs.lookup(parent.0, &name).await {
                // A negative entry: the kernel answers the next lookups itself.
                Err(e) if e.errno == restfs_proto::Errno::ENOENT && fs.absence_lasts(parent.0, &name) => {
                    reply.entry(&TTL, &absent_entry(), Generation(0))
                }
                r => entry(reply, r, bs),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.run("getattr", |fs, bs| async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&TTL, &file_attr(&a, bs)),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Under HANDLE_KILLPRIV_V2 the kernel leaves these to the filesystem.
        let kill_suidgid = uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0);
        let s = SetAttr { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime), kill_suidgid };
        self.run("setattr", |fs, bs| async move {
            match fs.setattr(ino.0, s).await {
                Ok(a) => reply.attr(&TTL, &file_attr(&a, bs)),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run("readlink", |fs, _| async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (c, name) = (Ctx { umask, ..ctx(req) }, bytes(name));
        self.run("mknod", |fs, bs| async move { entry(reply, fs.mknod(c, parent.0, &name, mode, rdev).await, bs) });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (c, name) = (Ctx { umask, ..ctx(req) }, bytes(name));
        self.run("mkdir", |fs, bs| async move { entry(reply, fs.mkdir(c, parent.0, &name, mode).await, bs) });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = bytes(name);
        self.run("unlink", |fs, _| async move { empty(reply, fs.unlink(parent.0, &name).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = bytes(name);
        self.run("rmdir", |fs, _| async move { empty(reply, fs.rmdir(parent.0, &name).await) });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (c, name, target) = (ctx(req), bytes(link_name), bytes(target.as_os_str()));
        self.run("symlink", |fs, bs| async move { entry(reply, fs.symlink(c, parent.0, &name, &target).await, bs) });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let (name, newname) = (bytes(name), bytes(newname));
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        self.run(
            "rename",
            |fs, _| async move { empty(reply, fs.rename(parent.0, &name, newparent.0, &newname, noreplace, exchange).await) },
        );
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let name = bytes(newname);
        self.run("link", |fs, bs| async move { entry(reply, fs.link_node(ino.0, newparent.0, &name).await, bs) });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Closing a read-only descriptor commits nothing: the kernel need not ask.
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        self.run("open", |fs, _| async move {
            match fs.open(ino.0).await {
                Ok(o) => {
                    let mut f = if o.keep_cache { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                    if read_only {
                        f |= FopenFlags::FOPEN_NOFLUSH;
                    }
                    reply.opened(FileHandle(o.fh), f)
                }
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run("read", |fs, _| async move {
            match fs.read_buf(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.run("write", |fs, _| async move {
            if kill && let Err(e) = fs.kill_suidgid(ino.0).await {
                return reply_error!(reply, e);
            }
            match fs.write(fh.0, offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        self.run("flush", |fs, _| async move {
            // A close drops its process's fcntl locks on the file.
            let flushed = fs.flush(fh.0).await;
            let unlocked = fs.unlock_owner(ino.0, lock_owner.0).await;
            empty(reply, flushed.and(unlocked))
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run("release", |fs, _| async move {
            let released = fs.release(fh.0).await;
            // The owner of the file's flock, if it took one.
            let unlocked = match lock_owner {
                Some(owner) => fs.unlock_owner(ino.0, owner.0).await,
                None => Ok(()),
            };
            empty(reply, released.and(unlocked).and(fs.unlock_handle(fh.0).await))
        });
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let asker = req.pid();
        self.run("getlk", |fs, _| async move {
            match fs.getlk(ino.0, lock_owner.0, (start, end), typ, pid, asker).await {
                Ok((start, end, typ, pid)) => reply.locked(start, end, typ, pid),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let waiter = req.pid();
        self.run(
            "setlk",
            |fs, _| async move { empty(reply, fs.setlk(ino.0, fh.0, lock_owner.0, (start, end), typ, pid, waiter, sleep).await) },
        );
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.run("fsync", |fs, _| async move { empty(reply, fs.fsync(fh.0).await) });
    }

    /// The kernel keeps the listing (KEEP_CACHE, or it drops it at every
    /// open) until the directory's mtime or its own changes say it moved,
    /// or an invalidation from a push drops its pages.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run("opendir", |fs, _| async move {
            match fs.opendir(ino.0).await {
                Ok((fh, true)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE),
                Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.run("readdir", |fs, _| async move {
            let dir = match fs.dir(fh.0, offset).await {
                Ok(d) => d,
                Err(e) => return reply_error!(reply, e),
            };
            let dots = [(dir.ino, FileType::Directory, &b"."[..]), (dir.parent, FileType::Directory, &b".."[..])];
            let listing = dots.into_iter().chain(dir.entries.iter().map(|e| (e.attr.ino, file_type(e.attr.kind), e.name.as_bytes())));
            for (i, (ino, kind, name)) in listing.enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.run("readdirplus", |fs, view| async move {
            let dir = match fs.dir(fh.0, offset).await {
                Ok(d) => d,
                Err(e) => return reply_error!(reply, e),
            };
            // The kernel ignores the attributes of `.` and `..`; only their inode matters.
            let dot = |ino| Attr {
                ino,
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                nlink: 2,
                size: 0,
                atime: Timespec::default(),
                mtime: Timespec::default(),
                ctime: Timespec::default(),
                rdev: 0,
                version: 0,
            };
            let dots = [(dot(dir.ino), &b"."[..], Duration::ZERO), (dot(dir.parent), &b".."[..], Duration::ZERO)];
            let listing = dots.into_iter().chain(dir.entries.iter().map(|e| (e.attr.clone(), e.name.as_bytes(), TTL)));
            for (i, (attr, name, ttl)) in listing.enumerate().skip(offset as usize) {
                if reply.add(INodeNo(attr.ino), i as u64 + 1, OsStr::from_bytes(name), &ttl, &file_attr(&attr, view), Generation(0)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are committed when made; this waits until they are on disk.
        self.run("fsyncdir", |fs, _| async move {
            let r = fs.syncfs().await;
            empty(reply, r)
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run("statfs", |fs, _| async move {
            match fs.statfs().await {
                Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn setxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        let (name, value) = (bytes(name), value.to_vec());
        self.run("setxattr", |fs, _| async move { empty(reply, fs.setxattr(ino.0, &name, &value, mode).await) });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = bytes(name);
        self.run("getxattr", |fs, _| async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Ok(v) => reply.data(&v),
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.run("listxattr", |fs, _| async move {
            match fs.listxattr(ino.0).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    if size == 0 {
                        reply.size(buf.len() as u32)
                    } else if buf.len() > size as usize {
                        reply.error(Errno::ERANGE)
                    } else {
                        reply.data(&buf)
                    }
                }
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = bytes(name);
        self.run("removexattr", |fs, _| async move { empty(reply, fs.removexattr(ino.0, &name).await) });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        let (c, name) = (Ctx { umask, ..ctx(req) }, bytes(name));
        self.run("create", |fs, bs| async move {
            match fs.create(c, parent.0, &name, mode).await {
                Ok((a, o)) => {
                    let flags = if o.keep_cache { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                    reply.created(&TTL, &file_attr(&a, bs), Generation(0), FileHandle(o.fh), flags)
                }
                Err(e) => reply_error!(reply, e),
            }
        });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        self.run("fallocate", |fs, _| async move { empty(reply, fs.fallocate(fh.0, offset, length, mode).await) });
    }
}
