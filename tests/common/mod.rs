//! Shared end-to-end fixtures: a real `restfsd` process on a free loopback
//! port, and real FUSE mounts made by `mount.restfs -f` (the `restfs`
//! binary invoked under that name). Everything is torn down on drop.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const RESTFSD: &str = env!("CARGO_BIN_EXE_restfsd");
pub const RESTFS: &str = env!("CARGO_BIN_EXE_restfs");

/// A scratch directory under the target dir (searchable by every user, so
/// pjdfstest's unprivileged users can reach mounts inside it).
pub fn scratch(name: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Scratch dirs of earlier runs (their process is gone) are removed, so
    // they do not pile up; a failed run's stay until the next run.
    for old in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let file_name = old.file_name();
        let Some(pid) = file_name.to_str().and_then(|n| n.strip_prefix(name)).and_then(|r| r.strip_prefix('-')) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    let base = tmp.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    for dir in base.ancestors() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 && dir.starts_with(env!("CARGO_TARGET_TMPDIR")) {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755));
            }
        }
    }
    base
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Server {
    pub data: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// Extra restfsd arguments.
    args: Vec<String>,
    /// Extra environment variables of restfsd.
    envs: Vec<(String, String)>,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    /// Start with extra restfsd arguments (e.g. `--credentials FILE`).
    pub fn start_with(data: &Path, args: &[&str]) -> Server {
        Server::start_with_env(data, args, &[])
    }

    /// Start with extra arguments and environment variables.
    pub fn start_with_env(data: &Path, args: &[&str], envs: &[(String, String)]) -> Server {
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut s = Server { data: data.to_path_buf(), port: free_port(), child: None, args, envs: envs.to_vec() };
        // The free port may be taken again before restfsd binds it: pick another.
        for _ in 0..5 {
            if s.spawn() {
                return s;
            }
            s.port = free_port();
        }
        panic!("restfsd could not bind a free port");
    }

    /// Start restfsd; false if its port was taken meanwhile.
    pub fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.data.with_extension("log")).unwrap();
        let child = Command::new(RESTFSD)
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--data"])
            .arg(&self.data)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start restfsd");
        self.child = Some(child);
        // Its own word, not a connect: another test may hold the port for a
        // moment (free_port picks a port, then lets it go).
        let deadline = Instant::now() + Duration::from_secs(20);
        let listening = format!("listening on ws://127.0.0.1:{}", self.port);
        // (The log was truncated above, so any such line is this start's.)
        while !std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default().contains(&listening) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let log = std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default();
                if log.contains("in use") {
                    self.child = None;
                    return false;
                }
                panic!("restfsd exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "restfsd did not start listening on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Send a signal (e.g. SIGSTOP / SIGCONT) to restfsd.
    pub fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("restfsd is running");
        unsafe { libc::kill(child.id() as i32, sig) };
    }

    /// Stop with SIGTERM (clean shutdown) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(status.success(), "restfsd exited with {status}");
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "restfsd could not bind its port {} again", self.port);
    }

    /// Run `restfs --server URL ARGS...`; returns (exit code, stdout+stderr).
    pub fn admin(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(RESTFS).arg("--server").arg(self.url()).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// A server counter, zero until it first moves (request counters
    /// appear with the first request of their method).
    pub fn counter_or_zero(&self, name: &str) -> u64 {
        let (code, out) = self.admin(&["server-stats"]);
        assert_eq!(code, 0, "server-stats failed: {out}");
        out.lines().find_map(|l| l.strip_prefix(&format!("{name}\t"))).map_or(0, |v| v.trim().parse().unwrap())
    }

    /// A server counter from `restfs server-stats`.
    pub fn counter(&self, name: &str) -> u64 {
        let (code, out) = self.admin(&["server-stats"]);
        assert_eq!(code, 0, "server-stats failed: {out}");
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in {out}"))
    }

    pub fn create_bucket(&self, name: &str) {
        let (code, out) = self.admin(&["bucket", "create", name]);
        assert_eq!(code, 0, "bucket create failed: {out}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use restfs::mount::is_restfs_mount;

pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mount `bucket` of `server` at `path` in the foreground with `options`.
    pub fn new(server: &Server, bucket: &str, path: &Path, options: &str) -> Mount {
        Mount::at_url(&server.url(), bucket, path, options)
    }

    /// [`Mount::new`] through the server at `url` (e.g. a [`Proxy`]).
    pub fn at_url(url: &str, bucket: &str, path: &Path, options: &str) -> Mount {
        // A dead mount left by a killed daemon exists but cannot be stat'ed: mount.restfs clears it.
        if let Err(e) = std::fs::create_dir_all(path) {
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "mountpoint {}: {e}", path.display());
        }
        // A killed daemon's dead mount may still answer stat() from the
        // kernel's caches (and device numbers and mount ids are reused):
        // wait for the new daemon to say it is mounted.
        let log_path = path.with_extension("mount.log");
        let mounted = || std::fs::read_to_string(&log_path).unwrap_or_default().matches(" mounted ws://").count();
        let before = mounted();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(path.with_extension("mount.log")).unwrap();
        let child = Command::new(RESTFS)
            .arg0("mount.restfs")
            .arg(format!("{url}/{bucket}"))
            .arg(path)
            .args(["-f", "-o", options])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mount.restfs");
        let mut m = Mount { path: path.to_path_buf(), child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ours = || is_restfs_mount(path) && mounted() > before;
        while !(ours() && std::fs::metadata(path).is_ok()) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(path.with_extension("mount.log")).unwrap_or_default();
                panic!("mount.restfs exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "mount at {} did not appear", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// `kill -9` the daemon; the mountpoint is left dead ("Transport endpoint
    /// is not connected") for the next mount to clean up.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Send `sig` to the daemon (SIGSTOP to freeze it, SIGCONT to resume).
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("daemon running").id();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path.with_extension("mount.log")).unwrap_or_default()
    }

    /// Unmount with umount(8) and wait for the daemon to exit cleanly.
    pub fn unmount(mut self) {
        self.unmount_inner(true);
    }

    fn unmount_inner(&mut self, check: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = Command::new("umount").arg(&self.path).output().unwrap();
        if !out.status.success() {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if check {
            assert!(out.status.success(), "umount failed: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(status.map(|s| s.code()), Some(Some(0)), "mount.restfs did not exit cleanly after umount");
            assert!(!is_restfs_mount(&self.path));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount_inner(false);
    }
}

/// The source tree of a crate this workspace depends on (always present in
/// the cargo registry after a build): tokio, a few hundred real files.
pub fn registry_crate_tree() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| dirs::home_dir().unwrap().join(".cargo"));
    let src = home.join("registry").join("src");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&src)
        .expect("cargo registry sources")
        .flatten()
        .flat_map(|index| std::fs::read_dir(index.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("tokio-1.")))
        .collect();
    found.sort();
    found.pop().expect("a tokio-1.x source tree in the cargo registry")
}

/// Compare two trees entry by entry: type, permission bits, mtime (ns),
/// symlink targets and file contents. Returns the number of entries.
pub fn assert_same_tree(a: &Path, b: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut count = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) =
            (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap_or_else(|e| panic!("{}: {e}", pb.display())));
        assert_eq!(ma.mode(), mb.mode(), "mode of {}", rel.display());
        if !ma.is_dir() {
            assert_eq!((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()), "mtime of {}", rel.display());
        }
        count += 1;
        if ma.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
                v.sort();
                v
            };
            let (na, nb) = (names(&pa), names(&pb));
            assert_eq!(na, nb, "entries of {}", rel.display());
            stack.extend(na.into_iter().map(|n| rel.join(n)));
        } else if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap(), "target of {}", rel.display());
        } else {
            assert_eq!(ma.len(), mb.len(), "size of {}", rel.display());
            assert!(same_content(&pa, &pb), "content of {}", rel.display());
        }
    }
    count
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Stream-compare two files.
pub fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        let mut got = 0;
        while got < n {
            let m = fb.read(&mut bb[got..n]).unwrap();
            if m == 0 {
                return false;
            }
            got += m;
        }
        if n == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Poll `done` until it holds; fails the test after `limit`. Returns how
/// long it took.
pub fn wait_until(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    start.elapsed()
}

/// A TCP relay to a server on loopback that can break its clients'
/// connections the way a failed network path does: the client sees its
/// side close, the server's side stays open and silent.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<Relayed>>>,
}

/// One relayed connection: the client's socket, the server's, and whether it was cut.
type Relayed = (std::net::TcpStream, std::net::TcpStream, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Proxy {
    pub fn start(server_port: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let list = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", server_port)) else { continue };
                let cut = std::sync::Arc::new(AtomicBool::new(false));
                // Each direction copies until its source ends; an end is passed
                // on, except to the server once the connection was cut.
                let relay = |mut from: std::net::TcpStream, mut to: std::net::TcpStream, cut: Option<std::sync::Arc<AtomicBool>>| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        if cut.is_none_or(|c| !c.load(Ordering::SeqCst)) {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    });
                };
                relay(client.try_clone().unwrap(), server.try_clone().unwrap(), Some(cut.clone()));
                relay(server.try_clone().unwrap(), client.try_clone().unwrap(), None);
                list.lock().unwrap().push((client, server, cut));
            }
        });
        Proxy { port, conns }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Close the clients' side of every connection so far; the server's
    /// side stays open until [`Proxy::close_servers_side`].
    pub fn cut_clients(&self) {
        for (client, _, cut) in self.conns.lock().unwrap().iter() {
            cut.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Close the server's side of every cut connection.
    pub fn close_servers_side(&self) {
        for (_, server, cut) in self.conns.lock().unwrap().iter() {
            if cut.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = server.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// [`two_mounts`], with `a` connected through a [`Proxy`] that can break
/// its connection: `(server, proxy, a's path, b's path, a, b)`.
pub fn two_mounts_a_relayed(name: &str) -> (Server, Proxy, PathBuf, PathBuf, Mount, Mount) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket("shared");
    let proxy = Proxy::start(server.port);
    let pa = root.join("a");
    let a = Mount::at_url(&proxy.url(), "shared", &pa, &format!("cache_dir={}", root.join("cache-a").display()));
    let (pb, b) = second_mount(&server, &root);
    (server, proxy, pa, pb, a, b)
}

/// Break the client's side of `a`'s connection, wait until `a` has
/// reconnected, then close the server's side of the old connection.
pub fn break_clients_side(proxy: &Proxy, a: &Mount) {
    proxy.cut_clients();
    wait_until("the mount reconnects", Duration::from_secs(20), || a.log().contains("reconnected to"));
    proxy.close_servers_side();
}

/// A fresh server with one bucket mounted twice, each with its own cache
/// directory: `(server, a's path, b's path, a, b)`. `options_a` is added to
/// a's options. Bind the server to a named variable: it must outlive both.
pub fn two_mounts(name: &str, options_a: &str) -> (Server, PathBuf, PathBuf, Mount, Mount) {
    let (server, root, pa, a) = one_mount(name, options_a);
    let (pb, b) = second_mount(&server, &root);
    (server, pa, pb, a, b)
}

/// A fresh server with the bucket `shared` mounted at `root/a` (cache in
/// `root/cache-a`, `options` added): `(server, root, a's path, a)`.
pub fn one_mount(name: &str, options: &str) -> (Server, PathBuf, PathBuf, Mount) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket("shared");
    let pa = root.join("a");
    let a = Mount::new(&server, "shared", &pa, &format!("cache_dir={}{options}", root.join("cache-a").display()));
    (server, root, pa, a)
}

/// The bucket of [`one_mount`] mounted again at `root/b` (cache in `root/cache-b`).
pub fn second_mount(server: &Server, root: &Path) -> (PathBuf, Mount) {
    second_mount_with(server, root, "")
}

/// [`second_mount`] with more `options`.
pub fn second_mount_with(server: &Server, root: &Path, options: &str) -> (PathBuf, Mount) {
    let pb = root.join("b");
    let b = Mount::new(server, "shared", &pb, &format!("cache_dir={},{options}", root.join("cache-b").display()));
    (pb, b)
}

/// Deterministic bytes at `offset` that differ per position and per seed.
pub fn pattern_at(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i).wrapping_mul(0x9E37_79B9) ^ seed.wrapping_mul(0x85EB_CA6B)) as u8).collect()
}

/// A tool `scripts/test.sh` installs into `target/tools` and names in the
/// environment variable `env` (else `cargo install`'s default place).
pub fn installed_tool(env: &str, name: &str, version: &str) -> String {
    if let Some(p) = std::env::var_os(env) {
        return p.to_string_lossy().into_owned();
    }
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| dirs::home_dir().unwrap().join(".cargo"));
    let installed = home.join("bin").join(name);
    assert!(installed.exists(), "{name} is not installed: run scripts/test.sh, or `cargo install {name} --locked --version {version}`");
    installed.to_string_lossy().into_owned()
}

/// A real S3-compatible server: s3s-fs 0.14.1 (which `scripts/test.sh`
/// installs) over a directory, on a free loopback port. Buckets are its
/// subdirectories.
pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "restfs-test";
    pub const SECRET_KEY: &'static str = "restfs-test-secret";

    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root).unwrap();
        let mut s = S3Server { root: root.to_path_buf(), port: free_port(), child: None };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.root.with_extension("log")).unwrap();
        let child = Command::new(installed_tool("S3S_FS", "s3s-fs", "0.14.1"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                Self::ACCESS_KEY,
                "--secret-key",
                Self::SECRET_KEY,
            ])
            .arg(&self.root)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let log = self.root.with_extension("log");
        let child = self.child.as_mut().unwrap();
        wait_until("s3s-fs listens", Duration::from_secs(20), || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("s3s-fs exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// What restfsd needs in its environment to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The objects under `bucket/prefix`.
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        std::fs::read_dir(self.root.join(bucket).join(prefix))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "s3s-fs is running");
        self.spawn();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
