//! `restfs-server`: the RestFS server behind the `restfsd` binary.
//!
//! Layers, outside in: [`ws`] (WebSocket front, frame limits) →
//! [`dispatch`] (per-connection session, one handler per method) →
//! [`service`] (open files, durability, GC, [`callbacks`], [`delegation`]) → the stores: [`meta`]
//! (`MetaStore`, SQLite by default) and [`blocks`] (`BlockStore`, a local
//! directory by default).

pub mod blocks;
pub mod callbacks;
pub mod cli;
pub mod delegation;
pub mod dispatch;
pub mod error;
pub mod locks;
pub mod meta;
pub mod service;
pub mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{Error, Result};
pub use service::Service;

/// `$XDG_DATA_HOME/restfs` (`~/.local/share/restfs`), or `./restfs-data`.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().map(|d| d.join("restfs")).unwrap_or_else(|| PathBuf::from("restfs-data"))
}

/// Where blocks go: the data directory (the default) or an S3 bucket.
#[derive(Clone, Debug, Default)]
pub enum BlocksIn {
    #[default]
    DataDir,
    S3(blocks::s3::S3Location),
}

/// How to start a server beyond its address and data directory.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Answer only clients that present this token.
    pub token: Option<String>,
    pub blocks: BlocksIn,
}

/// A running server: SQLite metadata in the data directory, blocks there
/// too or in an S3 bucket.
pub struct Server {
    pub addr: SocketAddr,
    pub service: Arc<Service>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Open the stores under `data` and listen on `listen` (port 0 picks one).
    pub async fn start(listen: SocketAddr, data: &Path) -> std::result::Result<Server, String> {
        Server::start_with(listen, data, Options::default()).await
    }

    /// The same, with `options`.
    pub async fn start_with(listen: SocketAddr, data: &Path, options: Options) -> std::result::Result<Server, String> {
        std::fs::create_dir_all(data).map_err(|e| format!("cannot create data directory {}: {e}", data.display()))?;
        let meta = meta::sqlite::SqliteMeta::open(&data.join("meta.db"))
            .map_err(|e| format!("cannot open metadata in {}: {e}", data.display()))?;
        // Purged once their clients, reconnecting, had the time to open them again.
        let left_open = meta::MetaStore::orphans(&meta).map_err(|e| e.to_string())?;
        let location = match &options.blocks {
            BlocksIn::DataDir => blocks::IN_DATA_DIR.to_string(),
            BlocksIn::S3(at) => at.name(),
        };
        blocks::check_location(data, &location)?;
        let blocks: Arc<dyn blocks::BlockStore> = match &options.blocks {
            BlocksIn::DataDir => {
                Arc::new(blocks::dir::DirBlocks::open(data).map_err(|e| format!("cannot open block store in {}: {e}", data.display()))?)
            }
            BlocksIn::S3(at) => {
                let id = blocks::data_dir_id(data)?;
                let at = at.clone();
                // Its requests block: off the runtime's threads.
                let store = tokio::task::spawn_blocking(move || {
                    let store = blocks::s3::S3Blocks::open(&at)?;
                    store.claim(&id, &at)?;
                    Ok::<_, Error>(store)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                Arc::new(store)
            }
        };
        // Bound only once the store answered: a typo or a refused claim binds nothing.
        blocks::bind_location(data, &location)?;
        let service = Service::new(Arc::new(meta), blocks);
        if service.locks.mark_at(data.join("locks.held")) {
            tracing::info!(
                "clients held locks when restfsd stopped: for {:?} only they can take locks, while they take theirs again",
                locks::RECLAIM_GRACE
            );
        }
        if let Some(token) = options.token {
            service.require_token(token);
        }
        service.spawn_background();
        service.purge_left_open(left_open, locks::RECLAIM_GRACE);
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let task = tokio::spawn(ws::serve(listener, service.clone()));
        Ok(Server { addr, service, task })
    }

    /// Stop accepting, finish the requests in flight, make everything durable.
    pub async fn shutdown(self) -> Result<()> {
        let result = self.service.shut_down(std::time::Duration::from_secs(10)).await;
        self.task.abort();
        result
    }
}
