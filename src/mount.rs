//! `mount.restfs`: argument and option parsing (mount(8) conventions) and
//! the mount lifecycle.
//!
//! Lifecycle: parse → (unless `-f`) fork before any runtime exists, the
//! parent waiting on a readiness pipe → connect and mount the bucket →
//! lock the cache directory → mount FUSE → report readiness → serve until
//! unmounted. SIGTERM/SIGINT commit open files, then unmount (lazily, so a
//! busy mount cannot hang us) and exit 0.

use crate::client::{Link, ServerUrl};
use crate::fs::Fs;
use crate::fuse::{FuseAdapter, Presentation};
use crate::kernel_mount::{self, KernelMount};
use restfs_proto::credentials::Credentials;
use restfs_proto::methods::{BucketMount, BucketName};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of blocks the in-memory block cache keeps (in front of the ring).
const MEMORY_CACHE_BYTES: usize = 64 << 20;

/// Default on-disk cache: a tenth of the free space, at most 10 GiB.
fn default_cache_size(dir: &Path) -> u64 {
    let free = free_space(dir).unwrap_or(1 << 30);
    (free / 10).clamp(restfs_cache::ring::MIN_CAPACITY, 10 << 30)
}

fn free_space(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a writable statvfs.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// `64M`, `2G`, `512K` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (e.g. 512M, 4G)"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: unknown size unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Mount options (`-o`).
#[derive(Debug, Clone)]
pub struct Options {
    pub cache_dir: Option<PathBuf>,
    /// Bytes of the on-disk block cache; default a share of free space.
    pub cache_size: Option<u64>,
    pub allow_other: bool,
    pub read_only: bool,
    /// Take the bucket's delegation when this mount is alone (write-behind).
    pub delegate: bool,
    /// Owner and mode overrides, and the writeback cache (see the README).
    pub presentation: Presentation,
    /// Credentials file holding the server's token.
    pub credentials: Option<PathBuf>,
    pub debug: bool,
    pub mount_timeout: Duration,
    /// Outages shorter than this show no error to applications.
    pub reconnect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cache_dir: None,
            cache_size: None,
            allow_other: false,
            read_only: false,
            delegate: true,
            presentation: Presentation::default(),
            credentials: None,
            debug: false,
            mount_timeout: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(60),
        }
    }
}

/// Generic mount(8)/fstab options that are ours to accept and ignore.
const IGNORED: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "noatime",
    "atime",
    "relatime",
    "strictatime",
    "nodiratime",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "default_permissions",
];

impl Options {
    /// Apply one comma-separated `-o` list.
    pub fn apply(&mut self, list: &str) -> Result<(), String> {
        for opt in list.split(',').filter(|o| !o.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let need = || value.filter(|v| !v.is_empty()).ok_or_else(|| format!("option {key} needs a value ({key}=...)"));
            match key {
                "cache_dir" => self.cache_dir = Some(PathBuf::from(need()?)),
                "cache_size" => self.cache_size = Some(parse_size(need()?)?),
                "allow_other" => self.allow_other = true,
                "ro" => self.read_only = true,
                "writeback" => self.presentation.writeback = true,
                "nodelegate" => self.delegate = false,
                "uid" => self.presentation.uid = Some(user_id(need()?)?),
                "gid" => self.presentation.gid = Some(group_id(need()?)?),
                "umask" => {
                    let v = need()?;
                    self.presentation.umask = u32::from_str_radix(v, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| format!("umask must be octal, like 022, not {v:?}"))?;
                }
                "credentials" => self.credentials = Some(PathBuf::from(need()?)),
                "debug" => self.debug = true,
                "reconnect_timeout" => {
                    let secs: u64 = need()?.parse().map_err(|_| format!("reconnect_timeout must be whole seconds, not {value:?}"))?;
                    // A call is resent under its id until the timeout; past the
                    // server's replay window it could be applied twice.
                    if secs >= restfs_proto::REPLAY_KEEP_SECS {
                        return Err(format!(
                            "reconnect_timeout must be under {} seconds (the server's replay window)",
                            restfs_proto::REPLAY_KEEP_SECS
                        ));
                    }
                    self.reconnect_timeout = Duration::from_secs(secs);
                }
                "mount_timeout" => {
                    let secs: u64 = need()?.parse().map_err(|_| format!("mount_timeout must be whole seconds, not {value:?}"))?;
                    self.mount_timeout = Duration::from_secs(secs.max(1));
                }
                k if IGNORED.contains(&k) || k.starts_with("x-systemd.") || k.starts_with("x-") || k.starts_with("comment=") => {}
                _ => return Err(format!("unknown mount option {opt:?}")),
            }
        }
        Ok(())
    }
}

/// A number, or the id `lookup` finds for the name (`what`: "user", "group").
fn id_of(name: &str, what: &str, lookup: impl FnOnce(&std::ffi::CStr) -> Option<u32>) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad {what} name {name:?}"))?;
    lookup(&c).ok_or_else(|| format!("no such {what} {name:?}"))
}

/// A user name or number.
fn user_id(name: &str) -> Result<u32, String> {
    // SAFETY: a valid C string; a non-null entry is read at once, before any other lookup.
    id_of(name, "user", |c| unsafe { libc::getpwnam(c.as_ptr()).as_ref().map(|pw| pw.pw_uid) })
}

/// A group name or number.
fn group_id(name: &str) -> Result<u32, String> {
    // SAFETY: as in `user_id`.
    id_of(name, "group", |c| unsafe { libc::getgrnam(c.as_ptr()).as_ref().map(|gr| gr.gr_gid) })
}

/// A parsed `mount.restfs SOURCE MOUNTPOINT [-o OPTIONS] [-f] [-s] [-n] [-v]`.
#[derive(Debug, Clone)]
pub struct MountArgs {
    pub source: ServerUrl,
    pub bucket: String,
    pub mountpoint: PathBuf,
    pub options: Options,
    pub foreground: bool,
    /// The token from the credentials file, read before forking.
    pub token: Option<String>,
}

pub const USAGE: &str = "usage: mount.restfs ws://HOST:PORT/BUCKET MOUNTPOINT [-o OPTION[,OPTION...]] [-f]

  -f                 stay in the foreground until unmounted (logs to stderr)
  -o cache_dir=DIR   local cache directory (one per mount; default under ~/.cache/restfs)
  -o cache_size=SIZE on-disk block cache size, e.g. 512M or 4G (default: 10% of free space, at most 10G)
  -o allow_other     let other users use the mount (permissions still apply)
  -o ro              mount read-only
  -o writeback       let the kernel buffer writes until close, fsync or memory pressure
  -o nodelegate      send every change to the server as it is made, even when alone
  -o uid=USER,gid=GROUP  show every file as owned by USER and GROUP (names or numbers)
  -o umask=077       hide these permission bits of every file
  -o credentials=FILE  file with the server's token= (mode 600)
  -o debug           verbose logging
  -o mount_timeout=S give up mounting after S seconds (default 30)
  -o reconnect_timeout=S  ride out server outages up to S seconds (default 60, under 3600)
  -s -n -v           accepted for mount(8) compatibility";

pub fn parse_args(args: &[String]) -> Result<MountArgs, String> {
    let mut positional = Vec::new();
    let mut options = Options::default();
    let mut foreground = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(USAGE.to_string()),
            "-f" => foreground = true,
            "-s" | "-n" | "-v" => {}
            // mount(8) may name the type (restfs, fuse.restfs): we know it.
            "-t" => drop(it.next().ok_or("-t needs a type")?),
            "-o" => options.apply(it.next().ok_or("-o needs an option list")?)?,
            s if s.starts_with("-o") => options.apply(&s[2..])?,
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!("unknown flag {s}\n{USAGE}"));
            }
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        return Err(format!("expected SOURCE and MOUNTPOINT\n{USAGE}"));
    };
    let source = ServerUrl::parse(source)?;
    let bucket = source.bucket.clone().ok_or_else(|| format!("{source} names no bucket: use ws://HOST:PORT/BUCKET"))?;
    let mountpoint = std::path::absolute(mountpoint).map_err(|e| format!("bad mountpoint {mountpoint:?}: {e}"))?;
    Ok(MountArgs { source, bucket, mountpoint, options, foreground, token: None })
}

fn default_cache_dir(args: &MountArgs) -> PathBuf {
    let base = dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("restfs");
    let tag: String = format!("{}_{}", args.source.authority, args.bucket)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' })
        .collect();
    base.join(tag)
}

/// Hold an exclusive lock on the cache directory for the life of the mount.
fn lock_cache_dir(dir: &Path) -> Result<File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create cache directory {}: {e}", dir.display()))?;
    let lock = File::create(dir.join("lock")).map_err(|e| format!("cannot open {}/lock: {e}", dir.display()))?;
    // A daemon that was just unmounted may still be committing and exiting: wait a little.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // SAFETY: flock on a valid, owned descriptor.
    while unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() > deadline {
            return Err(format!("cache directory {} is in use by another mount; give each mount its own -o cache_dir", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(lock)
}

/// If `path` is a dead FUSE mount ("Transport endpoint is not connected"),
/// detach it so it can be mounted again.
fn clear_stale_mount(path: &Path) {
    // Not stat(): with long TTLs the kernel may answer it from its caches.
    // statfs() always reaches the daemon, or fails if there is none.
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    // SAFETY: a valid C string and a zeroed out-buffer of the right type.
    let failed = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) != 0
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if failed && matches!(errno, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)) {
        tracing::warn!("{} is a stale mount; detaching it", path.display());
        let _ = lazy_unmount(path);
    }
}

/// Kernel readahead for the mount, in KiB: a FUSE mount gets its own
/// backing device with 128 KiB, which splits sequential reads into many
/// small requests. Best effort (needs root).
const READAHEAD_KB: u32 = 4096;

/// The newest mount at `path` in /proc/self/mountinfo: (device "major:minor",
/// filesystem type). Read without touching the mount itself.
pub fn mountinfo(path: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = path.to_string_lossy();
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1))?;
        let dev = f.get(2)?;
        (f.get(4) == Some(&target.as_ref())).then(|| (dev.to_string(), fstype.to_string()))
    })
}

/// Is `path` a RestFS mount (live or dead)?
pub fn is_restfs_mount(path: &Path) -> bool {
    std::path::absolute(path).ok().and_then(|p| mountinfo(&p)).is_some_and(|(_, fstype)| fstype == "fuse.restfs")
}

fn raise_readahead(mountpoint: &Path) {
    // From mountinfo, not stat(): the session does not serve requests yet.
    let Some((dev, _)) = mountinfo(mountpoint) else { return };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READAHEAD_KB.to_string()) {
        tracing::debug!("cannot raise readahead via {knob}: {e}");
    }
}

/// Resident memory above which freed heap goes back to the system...
const RESIDENT_SOFT_LIMIT: u64 = 160 << 20;
/// ...when at least this much of the heap is free (else there is nothing
/// worth a trim, which walks and locks every arena).
const FREE_HEAP_WORTH_TRIMMING: usize = 16 << 20;

/// Keep the daemon's memory bounded. Large buffers are served from the
/// heap and kept (see `keep_large_buffers`), which saves page faults but
/// lets freed chunks pile up between live ones (measured: 160 of 256 MiB
/// resident after a 10 GiB copy was free heap). Past the soft limit and
/// with enough of the heap free, hand free pages back. Looking costs a walk
/// of the heap under the arenas' locks, so a look that finds nothing to
/// trim waits twice as long for the next (up to half a minute), unless the
/// daemon grows meanwhile.
async fn bound_heap() {
    const PAGE: u64 = 4096;
    const LONGEST_WAIT: u32 = 32;
    let resident = || {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
            .map_or(0, |pages| pages * PAGE)
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut wait, mut waited, mut looked_at) = (1, 0, 0);
    loop {
        tick.tick().await;
        waited += 1;
        let now = resident();
        if now <= RESIDENT_SOFT_LIMIT {
            wait = 1;
            continue;
        }
        if waited < wait && now < looked_at + FREE_HEAP_WORTH_TRIMMING as u64 {
            continue;
        }
        waited = 0;
        // SAFETY: plain allocator calls.
        if unsafe { libc::mallinfo2() }.fordblks >= FREE_HEAP_WORTH_TRIMMING {
            unsafe { libc::malloc_trim(0) };
            wait = 1;
        } else {
            wait = (wait * 2).min(LONGEST_WAIT);
        }
        looked_at = resident();
    }
}

/// `umount2(path, MNT_DETACH)`.
pub fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `mount.restfs`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    restfs_server::cli::keep_large_buffers();
    let mut args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.restfs: {e}");
            return 1;
        }
    };
    match args.options.credentials.as_deref().map(|p| Credentials::load(p)?.require_token()).transpose() {
        Ok(token) => args.token = token,
        Err(e) => {
            eprintln!("mount.restfs: {e}");
            return 1;
        }
    }
    if args.foreground {
        crate::logging::to_stderr(args.options.debug);
        return match serve(&args, &mut None) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("mount.restfs: {e}");
                1
            }
        };
    }
    daemonize(args)
}

/// Fork; the child mounts and reports through a pipe, the parent waits.
fn daemonize(args: MountArgs) -> i32 {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("mount.restfs: pipe: {}", std::io::Error::last_os_error());
        return 1;
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no threads exist yet (no runtime was started), so fork is safe.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("mount.restfs: fork: {}", std::io::Error::last_os_error());
            1
        }
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls in the fresh child.
            unsafe { libc::setsid() };
            let cache_dir = args.options.cache_dir.clone().unwrap_or_else(|| default_cache_dir(&args));
            let _ = std::fs::create_dir_all(&cache_dir);
            redirect_stdio();
            let log = crate::logging::detached(args.options.debug, &cache_dir.join("mount.log"));
            tracing::debug!("logging to {log}");
            let mut ready = Some(File::from(write_end));
            match serve(&args, &mut ready) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    if let Some(mut ready) = ready {
                        let _ = ready.write_all(format!("ERR {e}").as_bytes());
                    }
                    1
                }
            }
        }
        child => {
            drop(write_end);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut msg = String::new();
                let _ = File::from(read_end).read_to_string(&mut msg);
                let _ = tx.send(msg);
            });
            // The child enforces mount_timeout itself; this is a backstop.
            let msg = match rx.recv_timeout(args.options.mount_timeout + Duration::from_secs(5)) {
                Ok(msg) if msg == "OK" => return 0,
                Ok(msg) => msg.strip_prefix("ERR ").unwrap_or("the mount daemon exited without reporting").to_string(),
                Err(_) => {
                    // SAFETY: signal our own child.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                    format!("mount did not complete within {:?}", args.options.mount_timeout)
                }
            };
            eprintln!("mount.restfs: {msg}");
            let mut status = 0;
            // SAFETY: reap our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            1
        }
    }
}

fn redirect_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
        // SAFETY: dup2 onto the standard descriptors.
        unsafe {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
        }
    }
}

/// Mount and serve until unmounted. `ready` gets "OK" once the mount is live.
fn serve(args: &MountArgs, ready: &mut Option<File>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("restfs")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let timeout = args.options.mount_timeout;
    let (link, mounted) = rt.block_on(async {
        let link = Link::connect_with(&args.source, timeout, args.options.reconnect_timeout, args.token.clone()).await?;
        let mounted = tokio::time::timeout(timeout, link.call::<BucketMount>(BucketName { name: args.bucket.clone() }))
            .await
            .map_err(|_| format!("server {} did not answer within {timeout:?}", args.source.authority))?
            .map_err(|e| match e.as_errno().0 {
                libc::ENOENT => format!(
                    "bucket {:?} does not exist on {} (create it with: restfs --server ws://{} bucket create {})",
                    args.bucket, args.source.authority, args.source.authority, args.bucket
                ),
                _ => format!("cannot mount bucket {:?}: {e}", args.bucket),
            })?;
        Ok::<_, String>((link, mounted))
    })?;
    let cache_dir = args.options.cache_dir.clone().unwrap_or_else(|| default_cache_dir(args));
    let _lock = lock_cache_dir(&cache_dir)?;
    clear_stale_mount(&args.mountpoint);
    // Another live RestFS mount there: refuse to stack on it. (Other
    // filesystems may be mounted over on purpose, e.g. systemd's autofs.)
    if mountinfo(&args.mountpoint).is_some_and(|(_, fstype)| fstype == "fuse.restfs") {
        return Err(format!("mountpoint {} is busy: a RestFS mount is already there", args.mountpoint.display()));
    }
    match std::fs::metadata(&args.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!("mountpoint {} is not a directory", args.mountpoint.display()));
        }
        Err(e) => return Err(format!("mountpoint {}: {e}", args.mountpoint.display())),
    }

    let cache_size = args.options.cache_size.unwrap_or_else(|| default_cache_size(&cache_dir));
    let ring = restfs_cache::BlockRing::open(&cache_dir.join("blocks.ring"), cache_size)
        .map_err(|e| format!("cannot open the block cache in {}: {e}", cache_dir.display()))?;
    tracing::info!("block cache: {} MiB in {}", ring.capacity() >> 20, cache_dir.display());
    // The identity includes the bucket's creation time: a bucket deleted and
    // created again under the same name must not inherit cached metadata.
    let b = &mounted.bucket;
    let identity = format!("{}/{}/{}.{}", args.source.authority, b.name, b.created.sec, b.created.nsec);
    let meta = restfs_cache::MetaCache::open(&cache_dir.join("meta.db"), &identity)
        .map_err(|e| format!("cannot open the metadata cache in {}: {e}", cache_dir.display()))?;
    // Blocks in the memory cache may pin their ring records: keep it a small share.
    let memory_cache = MEMORY_CACHE_BYTES.min(ring.capacity() as usize / 4);
    let mut fs = Fs::with_ring(link, mounted.bucket, memory_cache, Some(Arc::new(ring))).with_meta_cache(Arc::new(meta));
    if !args.options.delegate || args.options.read_only {
        fs = fs.without_delegation();
    }
    if args.options.presentation.writeback {
        fs = fs.with_kernel_times();
    }
    let fs = Arc::new(fs);
    let mut config = fuser::Config::default();
    config.n_threads = Some(2);
    if args.options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone(), args.options.presentation);
    let source = args.source.to_string();
    let explain = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::EBUSY) => format!("mountpoint {} is busy (already mounted?)", args.mountpoint.display()),
        _ => format!("cannot mount at {}: {e}", args.mountpoint.display()),
    };
    // SAFETY: plain getter.
    let session = if unsafe { libc::geteuid() } == 0 {
        let km =
            KernelMount { source: &source, subtype: "restfs", allow_other: args.options.allow_other, read_only: args.options.read_only };
        let fd = kernel_mount::mount(&km, &args.mountpoint).map_err(explain)?;
        fuser::Session::from_fd(adapter, fd, config.acl, config).map_err(explain)?
    } else {
        config.mount_options = vec![
            fuser::MountOption::FSName(source.clone()),
            fuser::MountOption::Subtype("restfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        if args.options.read_only {
            config.mount_options.push(fuser::MountOption::RO);
        }
        fuser::Session::new(adapter, &args.mountpoint, &config).map_err(explain)?
    };
    raise_readahead(&args.mountpoint);
    rt.spawn(bound_heap());
    fs.set_kernel_cache(Box::new(crate::fuse::KernelNotifier::new(session.notifier())));
    rt.block_on(fs.open_delegation_log(&cache_dir.join("delegated.log")))
        .map_err(|e| format!("cannot open the delegation log in {}: {e}", cache_dir.display()))?;
    rt.block_on(fs.subscribe()).map_err(|e| format!("cannot subscribe to changes: {e}"))?;
    rt.block_on(fs.recover_unacked());
    tracing::info!("mounted {} at {}", args.source, args.mountpoint.display());
    if let Some(mut ready) = ready.take() {
        let _ = ready.write_all(b"OK");
    }

    let (fs_sig, mountpoint) = (fs.clone(), args.mountpoint.clone());
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received: committing open files and unmounting {}", mountpoint.display());
        if let Err(e) = fs_sig.flush_all().await {
            tracing::error!("commit before unmount failed: {e}");
        }
        // A busy mount cannot block a lazy unmount.
        if let Err(e) = lazy_unmount(&mountpoint) {
            tracing::error!("unmount of {} failed: {e}", mountpoint.display());
        }
    });
    let served = session.run();
    rt.block_on(fs.flush_all()).map_err(|e| format!("commit at unmount failed: {e}"))?;
    if let Some(s) = fs.ring_stats() {
        tracing::info!(
            "block cache: hits={} misses={} corrupt={} inserts={} evictions={} blocks={} pinned={} bytes={}",
            s.hits,
            s.misses,
            s.corrupt,
            s.inserts,
            s.evictions,
            s.blocks,
            s.pinned,
            s.bytes
        );
    }
    tracing::info!("unmounted {}", args.mountpoint.display());
    rt.shutdown_timeout(Duration::from_secs(2));
    served.map_err(|e| format!("FUSE session ended with an error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<MountArgs, String> {
        parse_args(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err() && parse_size("M").is_err());
    }

    #[test]
    fn mount8_argument_order_and_options() {
        let a = args(&["ws://h:1/b", "/mnt", "-o", "rw,_netdev,x-systemd.automount,cache_dir=/c,allow_other", "-f"]).unwrap();
        assert_eq!(a.bucket, "b");
        assert!(a.foreground && a.options.allow_other && !a.options.presentation.writeback);
        let p = args(&["ws://h:1/b", "/mnt", "-o", "writeback,uid=nobody,gid=0,umask=027,credentials=/c"]).unwrap().options;
        assert!(p.presentation.writeback && p.credentials.as_deref() == Some(Path::new("/c")));
        assert_eq!((p.presentation.uid, p.presentation.gid, p.presentation.umask), (Some(65534), Some(0), 0o027));
        assert!(args(&["ws://h:1/b", "/mnt", "-o", "umask=999"]).unwrap_err().contains("octal"));
        assert!(args(&["ws://h:1/b", "/mnt", "-o", "uid=no-such-user"]).unwrap_err().contains("no-such-user"));
        assert_eq!(a.options.cache_dir.as_deref(), Some(Path::new("/c")));
        assert!(args(&["ws://h:1/b", "/mnt", "-o", "bogus"]).unwrap_err().contains("unknown mount option"));
        assert!(args(&["ws://h:1/b", "/mnt", "-ocache_dir="]).unwrap_err().contains("needs a value"));
        assert!(args(&["ws://h:1", "/mnt"]).unwrap_err().contains("no bucket"));
        assert!(args(&["ws://h:1/b"]).is_err());
        assert_eq!(
            args(&["ws://h:1/b", "/mnt", "-o", "reconnect_timeout=600"]).unwrap().options.reconnect_timeout,
            Duration::from_secs(600)
        );
        assert!(args(&["ws://h:1/b", "/mnt", "-o", "reconnect_timeout=3600"]).unwrap_err().contains("replay window"));
    }
}
