//! The `restfs` admin command line: buckets, garbage collection, `mount`,
//! `bench`, `stats`, and `up` (start an embedded-default server if none runs, create the
//! bucket if missing, mount it).
//!
//! Exit codes: 0 success; 1 the server refused (the message says why);
//! 2 bad usage; 3 the server could not be reached.

use crate::client::{Link, ServerUrl};
use clap::{Parser, Subcommand};
use restfs_proto::credentials::Credentials;
use restfs_proto::methods::*;
use restfs_proto::{BucketInfo, RpcError};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const DEFAULT_SERVER: &str = "ws://127.0.0.1:7878";

#[derive(Parser, Debug)]
#[command(name = "restfs", version, about = "RestFS administration: buckets, maintenance, mounting")]
pub struct Cli {
    /// Server to talk to.
    #[arg(long, short, env = "RESTFS_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// Credentials file for a server that needs a token (see mount-helpers/README.md).
    #[arg(long, env = "RESTFS_CREDENTIALS", global = true)]
    pub credentials: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command_,
}

#[derive(Subcommand, Debug)]
pub enum Command_ {
    /// Create, list, inspect or delete buckets.
    Bucket {
        #[command(subcommand)]
        action: BucketAction,
    },
    /// Show the server's counters (block traffic, requests).
    ServerStats,
    /// Collect unreferenced blocks on the server now.
    Gc {
        /// Keep unreferenced blocks younger than this many seconds.
        #[arg(long, default_value_t = 600)]
        min_age: u64,
    },
    /// Mount a bucket (same as mount.restfs): restfs mount ws://HOST:PORT/BUCKET DIR [-o OPTS] [-f].
    Mount {
        #[arg(allow_hyphen_values = true, num_args = 1.., trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmark a directory (normally on a RestFS mount): big and small
    /// files, with the client's counters.
    Bench(crate::bench::BenchArgs),
    /// Show the live counters of the RestFS mount holding PATH.
    Stats {
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Quick start: run a local restfsd with default paths if none answers,
    /// create the bucket if missing, and mount it at MOUNTPOINT.
    Up {
        mountpoint: PathBuf,
        /// Bucket to mount (created if missing).
        #[arg(long, default_value = "home")]
        bucket: String,
        /// Extra mount options, as for mount.restfs -o.
        #[arg(short = 'o')]
        options: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BucketAction {
    /// Create a bucket.
    Create {
        name: String,
        /// Block size in bytes (power of two, 4096..=8 MiB; default 1 MiB).
        #[arg(long)]
        block_size: Option<u32>,
    },
    /// List buckets.
    List,
    /// Show a bucket's properties and usage.
    Stat { name: String },
    /// Delete a bucket (refused if it holds objects, unless --force).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

enum Failure {
    Refused(String),
    Unreachable(String),
}

fn print_bucket(b: &BucketInfo) {
    println!("{}\tblock_size={}\tobjects={}\tbytes={}", b.name, b.block_size, b.objects, b.bytes);
}

async fn connect(cli: &Access) -> Result<Link, Failure> {
    let url = ServerUrl::parse(&cli.server).map_err(Failure::Refused)?;
    let token = cli.credentials.as_deref().map(|p| Credentials::load(p)?.require_token()).transpose().map_err(Failure::Refused)?;
    Link::connect_with(&url, Duration::from_secs(10), Duration::from_secs(60), token)
        .await
        .map_err(|e| if e.contains("bad credentials") { Failure::Refused(e) } else { Failure::Unreachable(e) })
}

fn refused(e: RpcError) -> Failure {
    Failure::Refused(e.message)
}

/// Where the server is and how to prove who we are.
struct Access {
    server: String,
    credentials: Option<PathBuf>,
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let access = Access { server: cli.server.clone(), credentials: cli.credentials.clone() };
    match cli.command {
        Command_::Bucket { action } => {
            let link = connect(&access).await?;
            match action {
                BucketAction::Create { name, block_size } => {
                    let b =
                        link.call::<BucketCreate>(BucketCreateParams { name, block_size, segment_blocks: None }).await.map_err(refused)?;
                    print_bucket(&b);
                }
                BucketAction::List => {
                    for b in link.call::<BucketList>(Empty {}).await.map_err(refused)?.buckets {
                        print_bucket(&b);
                    }
                }
                BucketAction::Stat { name } => print_bucket(&link.call::<BucketStat>(BucketName { name }).await.map_err(refused)?),
                BucketAction::Delete { name, force } => {
                    link.call::<BucketDelete>(BucketDeleteParams { name, force }).await.map_err(refused)?;
                }
            }
        }
        Command_::ServerStats => {
            let link = connect(&access).await?;
            for (k, v) in link.call::<Stats>(Empty {}).await.map_err(refused)?.counters {
                println!("{k}\t{v}");
            }
        }
        Command_::Gc { min_age } => {
            let link = connect(&access).await?;
            let r = link.call::<Gc>(GcParams { min_age_secs: Some(min_age) }).await.map_err(refused)?;
            println!("removed {} blocks ({} bytes)", r.blocks_removed, r.bytes_removed);
        }
        Command_::Mount { .. } | Command_::Stats { .. } | Command_::Bench(_) => unreachable!("handled before the runtime starts"),
        Command_::Up { mountpoint, bucket, options } => up(&cli.server, mountpoint, bucket, options).await?,
    }
    Ok(())
}

/// Start a local restfsd (sibling binary, default data dir) in the background.
fn spawn_server(server: &ServerUrl) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::Refused(e.to_string()))?;
    // The sibling restfsd, or this very binary acting as one (see bin/restfs.rs).
    let sibling = exe.with_file_name("restfsd");
    let restfsd = if sibling.exists() { sibling } else { exe.clone() };
    let data = restfs_server::default_data_dir();
    std::fs::create_dir_all(&data).map_err(|e| Failure::Refused(format!("cannot create {}: {e}", data.display())))?;
    let log = std::fs::File::create(data.join("restfsd.log")).map_err(|e| Failure::Refused(e.to_string()))?;
    let mut cmd = Command::new(&restfsd);
    std::os::unix::process::CommandExt::arg0(&mut cmd, "restfsd");
    cmd.arg("--listen")
        .arg(&server.authority)
        .arg("--data")
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| Failure::Refused(e.to_string()))?)
        .stderr(log);
    // SAFETY: setsid in the child before exec detaches it from our session.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| Failure::Refused(format!("cannot start {}: {e}", restfsd.display())))?;
    eprintln!("started restfsd on {} (data in {}, log in {}/restfsd.log)", server.authority, data.display(), data.display());
    Ok(())
}

async fn up(server: &str, mountpoint: PathBuf, bucket: String, options: Option<String>) -> Result<(), Failure> {
    if crate::mount::is_restfs_mount(&mountpoint) && std::fs::metadata(&mountpoint).is_ok() {
        eprintln!("{} is already a RestFS mount", mountpoint.display());
        return Ok(());
    }
    let url = ServerUrl::parse(server).map_err(Failure::Refused)?;
    let link = match Link::connect(&url, Duration::from_secs(2)).await {
        Ok(l) => l,
        Err(_) => {
            spawn_server(&url)?;
            let mut last = String::new();
            let mut link = None;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match Link::connect(&url, Duration::from_secs(2)).await {
                    Ok(l) => {
                        link = Some(l);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            link.ok_or(Failure::Unreachable(format!("restfsd did not come up: {last}")))?
        }
    };
    match link.call::<BucketCreate>(BucketCreateParams { name: bucket.clone(), block_size: None, segment_blocks: None }).await {
        Ok(_) => eprintln!("created bucket {bucket}"),
        Err(e) if e.as_errno() == restfs_proto::Errno::EEXIST => {}
        Err(e) => return Err(refused(e)),
    }
    std::fs::create_dir_all(&mountpoint).map_err(|e| Failure::Refused(format!("cannot create {}: {e}", mountpoint.display())))?;
    let exe = std::env::current_exe().map_err(|e| Failure::Refused(e.to_string()))?;
    let mut cmd = Command::new(exe);
    std::os::unix::process::CommandExt::arg0(&mut cmd, "mount.restfs");
    cmd.arg(format!("ws://{}/{bucket}", url.authority)).arg(&mountpoint);
    if let Some(o) = options {
        cmd.arg("-o").arg(o);
    }
    let status = cmd.status().map_err(|e| Failure::Refused(e.to_string()))?;
    if !status.success() {
        return Err(Failure::Refused("mount failed".into()));
    }
    eprintln!("mounted bucket {bucket} at {}; unmount with: umount {}", mountpoint.display(), mountpoint.display());
    Ok(())
}

/// Run the admin CLI; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if !matches!(cli.command, Command_::Mount { .. }) {
        // Output piped into `head` and the like: end quietly, as other tools
        // do (not the mount daemon, whose sockets must never raise SIGPIPE).
        // SAFETY: restoring the default disposition of one signal at start-up.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match &cli.command {
        Command_::Mount { args } => return crate::mount::main(args),
        Command_::Stats { path, json } => {
            return match crate::stats::read(path) {
                Ok(s) if *json => {
                    println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
                    0
                }
                Ok(s) => {
                    crate::stats::print(&s);
                    0
                }
                Err(e) => {
                    eprintln!("restfs: {e}");
                    1
                }
            };
        }
        Command_::Bench(args) => {
            return match crate::bench::run(args) {
                Ok(r) if args.json => {
                    println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
                    0
                }
                Ok(r) => {
                    crate::bench::print(&r);
                    0
                }
                Err(e) => {
                    eprintln!("restfs bench: {e}");
                    1
                }
            };
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(Failure::Refused(m)) => {
            eprintln!("restfs: {m}");
            1
        }
        Err(Failure::Unreachable(m)) => {
            eprintln!("restfs: {m}");
            3
        }
    }
}
