//! The system's mount machinery, for real: `mount-helpers/install.sh`
//! installs `/sbin/mount.restfs`, then util-linux `mount(8)` and `umount(8)`
//! drive it from an fstab file (`mount -T`) or the command line
//! (`mount -t restfs`), with the helper daemonizing as it does at boot.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Install the helper once per run (binaries of this build, under the
/// target directory; the links in /sbin point there).
fn install_helper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bin_dir = Path::new(RESTFS).parent().unwrap();
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helper-prefix");
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/mount-helpers/install.sh"))
            .env("RESTFS_BIN_DIR", bin_dir)
            .env("PREFIX", &prefix)
            .output()
            .unwrap();
        assert!(out.status.success(), "install.sh failed: {}", text(&out));
        let target = std::fs::read_link("/sbin/mount.restfs").unwrap();
        assert_eq!(target, prefix.join("bin/restfs"));
    });
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn mount(args: &[&str]) -> Output {
    Command::new("mount").args(args).output().unwrap()
}

/// `mount -t restfs SOURCE DIR -o OPTIONS`.
fn mount_restfs(source: &str, dir: &Path, options: &str) -> Output {
    mount(&["-t", "restfs", source, dir.to_str().unwrap(), "-o", options])
}

/// `findmnt` on `dir`: "FSTYPE SOURCE", or "" when nothing is mounted there.
fn findmnt(dir: &Path) -> String {
    let out = Command::new("findmnt").args(["-n", "-o", "FSTYPE,SOURCE", "--mountpoint"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Processes of mount daemons serving `dir`.
fn daemons(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.windows(b"mount.".len()).any(|w| w == b"mount.")
                && cmd.split(|b| *b == 0).any(|arg| arg == needle)
                && !cmd.starts_with(b"mount\0")
        })
        .collect()
}

/// A mountpoint under /tmp, which every user may traverse.
fn mountpoint(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("restfs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Whatever a test mounted at a point, gone when the test ends, even if
/// it fails: the mount detached, its daemons killed.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        while !findmnt(&self.0).is_empty() {
            if Command::new("umount").arg("-l").arg(&self.0).status().map_or(true, |s| !s.success()) {
                break;
            }
        }
        for pid in daemons(&self.0) {
            // SAFETY: killing a daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn umount(dir: &Path) {
    let out = Command::new("umount").arg(dir).output().unwrap();
    assert!(out.status.success(), "umount {}: {}", dir.display(), text(&out));
}

#[test]
fn fstab_entry_mounts_through_mount_8_and_umount_ends_the_daemon() {
    install_helper();
    let root = scratch("helper-fstab");
    let server = Server::start(&root.join("data"));
    server.create_bucket("tab");
    let mnt = mountpoint("fstab");
    let _cleanup = Cleanup(mnt.clone());
    let fstab = root.join("fstab");
    let source = format!("{}/tab", server.url());
    std::fs::write(
        &fstab,
        format!(
            "# a test fstab\n{source}  {}  restfs  rw,noauto,_netdev,nofail,noatime,nodev,nosuid,x-systemd.automount,cache_dir={}  0  0\n",
            mnt.display(),
            root.join("cache").display()
        ),
    )
    .unwrap();

    let out = mount(&["-T", fstab.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert!(out.status.success(), "mount -T failed: {}", text(&out));
    assert_eq!(findmnt(&mnt), format!("fuse.restfs {source}"));
    let pids = daemons(&mnt);
    assert_eq!(pids.len(), 1, "one daemon serves the mount: {pids:?}");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("file"), &data).unwrap();
    assert!(std::fs::read(mnt.join("file")).unwrap() == data);

    umount(&mnt);
    assert_eq!(findmnt(&mnt), "", "no mount left after umount");
    wait_until("the daemon exits after umount", Duration::from_secs(10), || daemons(&mnt).is_empty());

    // The data was committed: the same line mounts it again, here as `mount -t`.
    let out = mount_restfs(&source, &mnt, &format!("cache_dir={}", root.join("cache").display()));
    assert!(out.status.success(), "mount -t restfs failed: {}", text(&out));
    assert!(std::fs::read(mnt.join("file")).unwrap() == data, "data after remount");
    umount(&mnt);
    wait_until("the daemon exits after umount", Duration::from_secs(10), || daemons(&mnt).is_empty());
}

#[test]
fn failures_are_reported_by_mount_8_with_their_reason() {
    install_helper();
    let root = scratch("helper-failures");
    let mnt = mountpoint("failures");
    let _cleanup = Cleanup(mnt.clone());
    let cache = format!("cache_dir={}", root.join("cache").display());

    // Server down: a clear message within the mount timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let out = mount_restfs(&format!("ws://127.0.0.1:{port}/b"), &mnt, &format!("{cache},mount_timeout=3"));
    let took = started.elapsed();
    assert!(!out.status.success(), "mount succeeded with no server");
    assert!(text(&out).contains(&format!("127.0.0.1:{port}")), "message names the server: {}", text(&out));
    assert!(took < Duration::from_secs(9), "gave up after {took:?}, mount_timeout=3");
    assert_eq!(findmnt(&mnt), "");

    let server = Server::start(&root.join("data"));
    // Missing bucket.
    let out = mount_restfs(&format!("{}/nope", server.url()), &mnt, &cache);
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));

    // Unknown option.
    server.create_bucket("b");
    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &format!("{cache},frobnicate"));
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown mount option \"frobnicate\""), "{}", text(&out));

    // A credentials file others may read.
    let cred = root.join("cred");
    std::fs::write(&cred, "token=secret\n").unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &format!("{cache},credentials={}", cred.display()));
    assert!(!out.status.success(), "a world-readable credentials file was accepted");
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));

    // A busy mountpoint.
    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &cache);
    assert!(out.status.success(), "{}", text(&out));
    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &format!("cache_dir={}", root.join("cache2").display()));
    assert!(!out.status.success(), "mounted twice at one point");
    assert!(text(&out).contains("busy") || text(&out).contains("already"), "{}", text(&out));
    umount(&mnt);
    assert_eq!(findmnt(&mnt), "");
}

#[test]
fn a_server_with_credentials_admits_only_its_token() {
    install_helper();
    let root = scratch("helper-token");
    let server_cred = root.join("server.cred");
    std::fs::write(&server_cred, "# the server's secret\ntoken=s3cret-token\n").unwrap();
    std::fs::set_permissions(&server_cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = Server::start_with(&root.join("data"), &["--credentials", server_cred.to_str().unwrap()]);
    let (code, out) = server.admin(&["bucket", "create", "b"]);
    assert_ne!(code, 0, "a client without the token was served: {out}");
    let (code, out) = server.admin(&["--credentials", server_cred.to_str().unwrap(), "bucket", "create", "b"]);
    assert_eq!(code, 0, "{out}");

    let mnt = mountpoint("token");
    let _cleanup = Cleanup(mnt.clone());
    let cache = format!("cache_dir={}", root.join("cache").display());
    let wrong = root.join("wrong.cred");
    std::fs::write(&wrong, "token=guess\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &format!("{cache},credentials={}", wrong.display()));
    assert!(!out.status.success(), "mounted with a wrong token");
    assert!(text(&out).contains("bad credentials"), "{}", text(&out));

    let out = mount_restfs(&format!("{}/b", server.url()), &mnt, &format!("{cache},credentials={}", server_cred.display()));
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(mnt.join("f"), b"admitted").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"admitted");
    umount(&mnt);
}

#[test]
fn a_killed_daemon_leaves_a_mountpoint_the_next_mount_reuses() {
    install_helper();
    let root = scratch("helper-kill");
    let server = Server::start(&root.join("data"));
    server.create_bucket("k");
    let mnt = mountpoint("kill");
    let _cleanup = Cleanup(mnt.clone());
    let source = format!("{}/k", server.url());
    let opts = format!("cache_dir={}", root.join("cache").display());
    let out = mount_restfs(&source, &mnt, &opts);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(mnt.join("f"), b"before").unwrap();
    let pids = daemons(&mnt);
    assert_eq!(pids.len(), 1);
    // SAFETY: killing the daemon we found.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_until("the killed daemon is gone", Duration::from_secs(10), || daemons(&mnt).is_empty());
    let err = std::fs::metadata(mnt.join("f")).and_then(|_| std::fs::read_dir(&mnt).map(|_| ()));
    assert!(err.is_err(), "the dead mount still answers");

    let out = mount_restfs(&source, &mnt, &opts);
    assert!(out.status.success(), "mount over the dead mount failed: {}", text(&out));
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"before");
    umount(&mnt);
    // The dead mount was detached, not stacked under the new one.
    assert_eq!(findmnt(&mnt), "");
}

#[test]
fn a_bucket_as_a_home_directory_belongs_to_its_user_only() {
    install_helper();
    let root = scratch("helper-home");
    let server = Server::start(&root.join("data"));
    server.create_bucket("home");
    let home = mountpoint("home");
    let _cleanup = Cleanup(home.clone());
    let opts = format!("allow_other,uid=nobody,gid=nogroup,umask=077,cache_dir={}", root.join("cache").display());
    let out = mount_restfs(&format!("{}/home", server.url()), &home, &opts);
    assert!(out.status.success(), "{}", text(&out));

    let as_user = |user: &str, script: String| Command::new("su").args(["-s", "/bin/sh", user, "-c", &script]).output().unwrap();
    let x = home.join("x");
    let out = as_user("nobody", format!("touch {0} && echo hers > {0} && cat {0} && mkdir {1}", x.display(), home.join("dir").display()));
    assert!(out.status.success(), "nobody cannot use the home mounted for nobody: {}", text(&out));
    let meta = std::fs::metadata(&x).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600), "x as shown in the mount");
    let out = as_user("daemon", format!("ls {}", home.display()));
    assert!(!out.status.success(), "another user could list the home directory");
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));

    // The server stored the creator's identity, not just the presentation.
    let plain = root.join("plain");
    let m = Mount::new(&server, "home", &plain, &format!("cache_dir={}", root.join("cache-plain").display()));
    assert_eq!(std::fs::metadata(plain.join("x")).unwrap().uid(), 65534);
    assert_eq!(std::fs::read(plain.join("x")).unwrap(), b"hers\n");
    m.unmount();
    umount(&home);
}

/// The README's quick start with only the `restfs` binary built (what
/// `cargo run --bin restfs -- up` does): it starts a server from itself,
/// creates the bucket and mounts it; the server is named `restfsd`, so
/// `pkill restfsd` stops it as the README says.
#[test]
fn restfs_up_alone_starts_a_server_named_restfsd_and_mounts_home() {
    let root = scratch("up-alone");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(RESTFS, bin.join("restfs")).unwrap();
    let home = root.join("home");
    let mnt = mountpoint("up-alone");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("ws://127.0.0.1:{port}");
    let up = || {
        Command::new(bin.join("restfs"))
            .args(["--server", &server, "up"])
            .arg(&mnt)
            .env("HOME", &home)
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .output()
            .unwrap()
    };
    let out = up();
    assert!(out.status.success(), "restfs up failed: {}", text(&out));
    assert!(text(&out).contains("started restfsd"), "{}", text(&out));
    std::fs::write(mnt.join("hello"), b"from up").unwrap();
    umount(&mnt);
    let out = up();
    assert!(out.status.success(), "second restfs up failed: {}", text(&out));
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"from up");
    umount(&mnt);

    let data = home.join(".local/share/restfs");
    let servers: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.split(|b| *b == 0).any(|arg| arg == data.as_os_str().as_encoded_bytes())
        })
        .collect();
    assert_eq!(servers.len(), 1, "servers on {}: {servers:?}", data.display());
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", servers[0])).unwrap();
    assert_eq!(comm.trim(), "restfsd", "what `pkill restfsd` matches");
    // SAFETY: a signal to the server this test started.
    unsafe { libc::kill(servers[0], libc::SIGTERM) };
    wait_until("the server exits on SIGTERM", Duration::from_secs(10), || !Path::new(&format!("/proc/{}", servers[0])).exists());
}
