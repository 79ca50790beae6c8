//! The `restfsd` command line: `restfsd [--listen ADDR] [--data DIR] [--blocks s3://BUCKET[/PREFIX]] [--credentials FILE]`.
//! Runs in the foreground; SIGTERM or SIGINT syncs the stores and exits 0.

use crate::blocks::s3::S3Location;
use crate::{BlocksIn, Options, Server, default_data_dir};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "restfsd", version, about = "RestFS server: serves buckets over WebSocket JSON-RPC")]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], restfs_proto::DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Data directory (metadata database and blocks). Default: $XDG_DATA_HOME/restfs.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `restfs_server=trace`.
    #[arg(long, env = "RESTFS_LOG", default_value = "info")]
    pub log: String,
    /// Keep blocks in an S3-compatible bucket instead of the data directory:
    /// `s3://BUCKET[/PREFIX]`. The endpoint and credentials come from
    /// AWS_ENDPOINT_URL (default: AWS in AWS_REGION), AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_CA_BUNDLE.
    #[arg(long, value_name = "URL")]
    pub blocks: Option<String>,
    /// Credentials file whose `token=` every client must present.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
}

pub fn main() -> std::process::ExitCode {
    keep_large_buffers();
    let args = Args::parse();
    // Colours only on a terminal: `restfs up` sends this to a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        // ureq's own trace lines carry whole URLs, signatures included.
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log).add_directive("ureq=info".parse().expect("a valid directive")))
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let data = args.data.unwrap_or_else(default_data_dir);
    let token = match args.credentials.as_deref().map(|p| restfs_proto::credentials::Credentials::load(p)?.require_token()).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("restfsd: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let blocks = match args.blocks.as_deref().map(|url| S3Location::parse(url, |k| std::env::var(k).ok())).transpose() {
        Ok(Some(at)) => BlocksIn::S3(at),
        Ok(None) => BlocksIn::DataDir,
        Err(e) => {
            eprintln!("restfsd: --blocks {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let where_blocks = match &blocks {
        BlocksIn::S3(at) => at.to_string(),
        BlocksIn::DataDir => data.display().to_string(),
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let server = match Server::start_with(args.listen, &data, Options { token, blocks }).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("restfsd: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        // Ready for SIGTERM and SIGINT before saying so: a supervisor may send them at once.
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) =
            (signal(SignalKind::terminate()).expect("signal handler"), signal(SignalKind::interrupt()).expect("signal handler"));
        tracing::info!("restfsd listening on ws://{} (data in {}, blocks in {where_blocks})", server.addr, data.display());
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        match server.shutdown().await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("restfsd: final sync failed: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Block messages are megabytes each. By default glibc serves such sizes
/// with fresh mmaps, or trims them back to the system, so every message
/// paid page faults and zeroing (a quarter of the server's CPU in a
/// sequential write). Serve them from the heap and keep it.
pub fn keep_large_buffers() {
    // SAFETY: plain allocator tuning, before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}
