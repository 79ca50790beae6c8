//! Where `mount.restfs` logs: stderr in the foreground (`-f`); once
//! detached, journald when it runs, else syslog (`/dev/log`), else a file in
//! the cache directory. `-o debug` (or `RESTFS_LOG=filter`) raises the level.

use std::path::Path;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";
const SYSLOG_SOCKET: &str = "/dev/log";

fn filter(debug: bool) -> EnvFilter {
    let level = if debug { "debug" } else { "info" };
    EnvFilter::try_from_env("RESTFS_LOG").unwrap_or_else(|_| EnvFilter::new(format!("{level},fuser=warn")))
}

/// Log to stderr (foreground).
pub fn to_stderr(debug: bool) {
    tracing_subscriber::fmt()
        .with_env_filter(filter(debug))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Log as a detached daemon; `fallback` is the file used when the system
/// has neither journald nor syslog. Returns where the log goes.
pub fn detached(debug: bool, fallback: &Path) -> String {
    if Path::new(JOURNALD_SOCKET).exists()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry().with(filter(debug)).with(journald.with_syslog_identifier("mount.restfs".into())).init();
        return "journald".into();
    }
    if Path::new(SYSLOG_SOCKET).exists() {
        // SAFETY: a static identifier; openlog keeps the pointer.
        unsafe { libc::openlog(c"mount.restfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
        tracing_subscriber::fmt().with_env_filter(filter(debug)).with_ansi(false).without_time().with_writer(Syslog).init();
        return "syslog".into();
    }
    match std::fs::OpenOptions::new().create(true).append(true).open(fallback) {
        Ok(f) => {
            tracing_subscriber::fmt().with_env_filter(filter(debug)).with_ansi(false).with_writer(std::sync::Mutex::new(f)).init();
            fallback.display().to_string()
        }
        Err(_) => "nowhere".into(),
    }
}

/// Sends each formatted event to syslog with its level's priority.
struct Syslog;

/// One event's text, sent when the formatter is done with it.
struct SyslogLine {
    priority: libc::c_int,
    text: Vec<u8>,
}

impl std::io::Write for SyslogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text: Vec<u8> = self.text.iter().copied().filter(|b| *b != 0 && *b != b'\n').collect();
        if let Ok(line) = std::ffi::CString::new(text) {
            // SAFETY: a constant format string and a valid C string argument.
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), line.as_ptr()) };
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;

    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine { priority: libc::LOG_INFO, text: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogLine {
        let priority = match *meta.level() {
            tracing::Level::ERROR => libc::LOG_ERR,
            tracing::Level::WARN => libc::LOG_WARNING,
            tracing::Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        SyslogLine { priority, text: Vec::new() }
    }
}
