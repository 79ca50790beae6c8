//! pjdfstest (the POSIX conformance suite, crate 0.2.2) against a real
//! RestFS mount. `scripts/test.sh` installs it when missing. The run must
//! pass at least 95% of the non-skipped tests, and every failure must be
//! listed in `tests/pjdfstest/pjdfstest.toml` under `expected_failures`
//! (pjdfstest itself then reports it as expected, not as failed).

mod common;

use common::*;
use std::process::Command;

fn pjdfstest_binary() -> String {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return p.to_string_lossy().into_owned();
    }
    let home = std::env::var_os("CARGO_HOME").map(std::path::PathBuf::from).unwrap_or_else(|| dirs::home_dir().unwrap().join(".cargo"));
    let installed = home.join("bin/pjdfstest");
    assert!(installed.exists(), "pjdfstest is not installed: run scripts/test.sh, or `cargo install pjdfstest --locked --version 0.2.2`");
    installed.to_string_lossy().into_owned()
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
