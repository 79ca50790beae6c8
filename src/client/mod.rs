//! The client side of the link: one WebSocket carrying JSON-RPC.
//!
//! [`Link::call`] sends a typed request and awaits its response; many calls
//! may be in flight at once (responses are matched by id). The link speaks
//! BSON after `hello` so block payloads travel as binary. A lost connection
//! fails every pending call with ENOTCONN.

pub mod url;

use futures_util::{SinkExt, StreamExt};
use restfs_proto::methods::{Hello, HelloParams, PushChanges, PushParams};
use restfs_proto::rpc::{IdField, RawMessage, encode_request, split_frame};
use restfs_proto::{Encoding, Errno, Id, MAX_FRAME, Method, PROTOCOL_VERSION, RpcError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use url::ServerUrl;

type Pending = Arc<Mutex<HashMap<i64, oneshot::Sender<RawMessage>>>>;

/// Where change pushes from the server go, once someone listens.
type PushSink = Arc<Mutex<Option<mpsc::UnboundedSender<PushParams>>>>;

/// A connection to restfsd.
pub struct Link {
    out: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicI64,
    encoding: Encoding,
    alive: Arc<AtomicBool>,
    pushes: PushSink,
    pub server: String,
}

fn lost() -> RpcError {
    RpcError::errno(Errno::ENOTCONN, "connection to the server lost")
}

impl Link {
    /// Connect to `url` and negotiate with `hello`, within `timeout`.
    pub async fn connect(url: &ServerUrl, timeout: Duration) -> Result<Link, String> {
        let endpoint = url.endpoint();
        let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME)).max_frame_size(Some(MAX_FRAME));
        let connecting = tokio_tungstenite::connect_async_with_config(endpoint.as_str(), Some(config), true);
        let (ws, _) = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(format!("server {} did not answer within {timeout:?}", url.authority));
            }
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", url.authority)),
            Ok(Ok(ok)) => ok,
        };
        let (mut sink, mut source) = ws.split();
        let (out, mut rx) = mpsc::channel::<Message>(256);
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let pushes: PushSink = Arc::default();
        let (reader_pending, reader_alive, reader_pushes) = (pending.clone(), alive.clone(), pushes.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = source.next().await {
                let (enc, bytes) = match msg {
                    Message::Text(t) => (Encoding::Json, t.as_bytes().to_vec()),
                    Message::Binary(b) => (Encoding::Bson, b.to_vec()),
                    Message::Close(_) => break,
                    _ => continue,
                };
                let Ok(frame) = split_frame(enc, &bytes) else {
                    tracing::warn!("unparseable frame from the server");
                    continue;
                };
                for m in frame.messages {
                    let Ok(head) = m.head() else { continue };
                    match head.id {
                        IdField::Valid(Id::Num(id)) => {
                            if let Some(tx) = reader_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                                let _ = tx.send(m);
                            }
                        }
                        _ => match head.error {
                            Some(e) => tracing::warn!("server error without id: {e}"),
                            None if head.method.as_deref() == Some(PushChanges::NAME) => match m.params::<PushParams>() {
                                Ok(push) => {
                                    if let Some(tx) = reader_pushes.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                                        let _ = tx.send(push);
                                    }
                                }
                                Err(e) => tracing::warn!("malformed push from the server: {e}"),
                            },
                            None => tracing::debug!("notification {:?} ignored", head.method),
                        },
                    }
                }
            }
            reader_alive.store(false, Ordering::Release);
            // Dropping the senders fails every pending call.
            reader_pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        let mut link = Link { out, pending, next_id: AtomicI64::new(1), encoding: Encoding::Json, alive, pushes, server: String::new() };
        let hello = HelloParams {
            versions: vec![PROTOCOL_VERSION],
            encodings: vec![Encoding::Bson, Encoding::Json],
            capabilities: vec![restfs_proto::CAP_PUSH.to_string()],
            client: format!("restfs {}", env!("CARGO_PKG_VERSION")),
        };
        let reply = tokio::time::timeout(timeout, link.call::<Hello>(hello))
            .await
            .map_err(|_| format!("server {} did not answer hello within {timeout:?}", url.authority))?
            .map_err(|e| format!("handshake with {} failed: {e}", url.authority))?;
        link.encoding = reply.encoding;
        link.server = reply.server;
        Ok(link)
    }

    /// Receive the change pushes of subscriptions made on this link.
    pub fn pushes(&self) -> mpsc::UnboundedReceiver<PushParams> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.pushes.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Call `M` and await its result.
    pub async fn call<M: Method>(&self, params: M::Params) -> Result<M::Result, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let bytes = encode_request(self.encoding, Some(&Id::Num(id)), M::NAME, &params);
        if self.send(bytes).await.is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(lost());
        }
        let reply = rx.await.map_err(|_| lost())?;
        reply.result::<M::Result>()
    }

    /// Send `M` as a notification: no response, no waiting.
    pub async fn notify<M: Method>(&self, params: M::Params) -> Result<(), RpcError> {
        let bytes = encode_request(self.encoding, None, M::NAME, &params);
        self.send(bytes).await.map_err(|_| lost())
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), ()> {
        let msg = match self.encoding {
            Encoding::Json => Message::text(String::from_utf8(bytes).map_err(|_| ())?),
            Encoding::Bson => Message::binary(bytes),
        };
        self.out.send(msg).await.map_err(|_| ())
    }
}
