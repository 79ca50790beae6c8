//! pjdfstest (the POSIX conformance suite, crate 0.2.2) against a real
//! RestFS mount. `scripts/test.sh` installs it when missing. The run must
//! pass at least 95% of the non-skipped tests, and every failure must be
//! listed in `tests/pjdfstest/pjdfstest.toml` under `expected_failures`
//! (pjdfstest itself then reports it as expected, not as failed).

mod common;

use common::*;
use std::process::Command;

fn pjdfstest_binary() -> String {
    installed_tool("PJDFSTEST", "pjdfstest", "0.2.2")
}

/// Numbers from pjdfstest's `Summary:` line: (failed, skipped, passed, expected failures).
fn summary(output: &str) -> (u64, u64, u64, u64) {
    let line =
        output.lines().rev().find(|l| l.starts_with("Summary:")).unwrap_or_else(|| panic!("no summary in pjdfstest output:\n{output}"));
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = line.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
        let i = words.iter().position(|w| *w == word).unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
        words[i - 1].parse().unwrap()
    };
    (number_before("failed"), number_before("skipped"), number_before("passed"), number_before("expected"))
}

#[test]
fn pjdfstest_passes_on_a_mount() {
    pjdfstest("pjdfstest", "", 0.001);
}

/// With the writeback cache the kernel stamps a regular file's ctime and
/// mtime itself, from its coarse clock (one tick: 4 ms at HZ=250), so the
/// suite must nap longer than that to see them change.
#[test]
fn pjdfstest_passes_through_the_kernels_writeback_cache() {
    pjdfstest("pjdfstest-wb", ",writeback", 0.01);
}

fn pjdfstest(name: &str, options: &str, naptime: f64) {
    let root = scratch(name);
    let server = Server::start(&root.join("data"));
    server.create_bucket("posix");
    // The unprivileged users pjdfstest switches to must reach the mount: /tmp is searchable by all.
    let mnt = std::env::temp_dir().join(format!("restfs-{name}-{}", std::process::id()));
    let m = Mount::new(&server, "posix", &mnt, &format!("allow_other,cache_dir={}{options}", root.join("cache").display()));
    std::fs::set_permissions(&mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let base = include_str!("pjdfstest/pjdfstest.toml");
    assert!(base.contains("naptime = 0.001\n"));
    let config = root.join("pjdfstest.toml");
    std::fs::write(&config, base.replace("naptime = 0.001\n", &format!("naptime = {naptime}\n"))).unwrap();
    let out = Command::new(pjdfstest_binary())
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&mnt)
        .current_dir(&mnt)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|l| l.contains("FAILED") || l.contains("PASSED UNEXPECTEDLY") || l.starts_with('\t')) {
        println!("{line}");
    }
    let (failed, skipped, passed, expected) = summary(&text);
    let ran = failed + passed + expected;
    let rate = 100.0 * passed as f64 / ran as f64;
    // Written past libtest's output capture, so the figure shows in CI logs.
    let figure = format!(
        "pjdfstest on RestFS: {passed} passed of {ran} non-skipped ({rate:.1}%), {skipped} skipped, {expected} expected failures, {failed} unexpected failures\n"
    );
    std::io::Write::write_all(&mut std::io::stderr().lock(), figure.as_bytes()).unwrap();
    m.unmount();
    let _ = std::fs::remove_dir(&mnt);
    assert_eq!(failed, 0, "failures not listed in expected_failures (see above)");
    assert!(rate >= 95.0, "pass rate {rate:.1}% is below 95%");
}

/// The kernel leaves dropping set-ID bits and file capabilities on an
/// unprivileged write or truncate, and on chown, to the filesystem
/// (HANDLE_KILLPRIV_V2). Expected modes are what ext4 does.
#[test]
fn writes_truncates_and_chown_drop_set_id_bits_and_capabilities() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let root = scratch("killpriv");
    let server = Server::start(&root.join("data"));
    server.create_bucket("posix");
    let mnt = std::env::temp_dir().join(format!("restfs-killpriv-{}", std::process::id()));
    let m = Mount::new(&server, "posix", &mnt, &format!("allow_other,cache_dir={}", root.join("cache").display()));
    std::fs::set_permissions(&mnt, PermissionsExt::from_mode(0o755)).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let as_nobody = |script: &str, p: &std::path::Path| {
        let st = Command::new("sh").arg("-c").arg(script).arg(p).uid(65534).gid(65534).status().unwrap();
        assert!(st.success(), "{script} on {} as nobody", p.display());
    };
    let append_as_nobody = |p: &std::path::Path| as_nobody("printf y >> \"$0\"", p);
    // (file, mode before, mode after a write by another user)
    for (name, before, after) in [("suid", 0o6777, 0o0777), ("sgid-x", 0o2777, 0o0777), ("sgid", 0o2766, 0o2766), ("plain", 0o0666, 0o0666)]
    {
        let p = mnt.join(name);
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, PermissionsExt::from_mode(before)).unwrap();
        append_as_nobody(&p);
        assert_eq!(mode(&p), after, "{name}: mode after an unprivileged write");
        assert_eq!(std::fs::read(&p).unwrap(), b"xy");
    }
    // Truncates by another user, and chown by anyone (root here).
    for (script, after) in [(": > \"$0\"", 0o0777), ("truncate -s 1 \"$0\"", 0o0777)] {
        let p = mnt.join("truncated");
        std::fs::write(&p, b"xx").unwrap();
        std::fs::set_permissions(&p, PermissionsExt::from_mode(0o6777)).unwrap();
        as_nobody(script, &p);
        assert_eq!(mode(&p), after, "{script}: mode after an unprivileged truncate");
    }
    let p = mnt.join("chowned");
    std::fs::write(&p, b"x").unwrap();
    for (before, after) in [(0o6777, 0o0777), (0o2767, 0o2767)] {
        std::fs::set_permissions(&p, PermissionsExt::from_mode(before)).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        assert_eq!(mode(&p), after, "{before:o}: mode after chown");
    }
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::set_permissions(mnt.join("dir"), PermissionsExt::from_mode(0o6777)).unwrap();
    std::os::unix::fs::chown(mnt.join("dir"), Some(65534), None).unwrap();
    assert_eq!(mode(&mnt.join("dir")), 0o6777, "a directory keeps its set-ID bits through chown");

    // A file capability (cap_net_raw+ep, VFS_CAP_REVISION_2) goes too.
    let p = mnt.join("cap");
    std::fs::write(&p, b"x").unwrap();
    std::fs::set_permissions(&p, PermissionsExt::from_mode(0o666)).unwrap();
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = c"security.capability";
    let cap: [u8; 20] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: valid C strings and a buffer of the given length.
    assert_eq!(unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), cap.as_ptr().cast(), cap.len(), 0) }, 0, "setxattr");
    let has_cap = || {
        let mut buf = [0u8; 64];
        // SAFETY: as above.
        let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    };
    assert!(has_cap());
    append_as_nobody(&p);
    assert!(!has_cap(), "the capability survived an unprivileged write");
    m.unmount();
}
