//! The WebSocket front: accept connections on `/`, read frames, dispatch
//! every message concurrently, write responses through one writer task.
//!
//! A change is answered only after other clients holding leases applied
//! it ([`crate::callbacks`]); a connection whose lease is revoked closes,
//! and so does one that holds a lease but falls silent ([`SILENCE`]).
//!
//! Limits: a message above [`MAX_FRAME`] bytes is answered with a
//! `FRAME_TOO_LARGE` error and the connection is closed (code 1009); other
//! connections are not affected. Text frames are JSON, binary frames BSON;
//! responses use the encoding of the frame they answer.

use crate::dispatch::Session;
use crate::service::Service;
use futures_util::{SinkExt, StreamExt};
use restfs_proto::rpc::{RpcError, code, encode_batch, encode_response, split_frame};
use restfs_proto::{Encoding, MAX_FRAME};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Accept connections until the service starts closing.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    let mut closing = service.closing();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = closing.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let service = service.clone();
                let token = service.connection_token();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, service).await {
                        tracing::debug!("connection from {peer}: {e}");
                    }
                    drop(token);
                });
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A client holding a lease pings well within it when it has nothing else
/// to say: when no byte has come from it for this long, it is gone (or cut
/// off), and its connection closes, taking its locks with it. (Bytes, not
/// messages: a large frame on a slow link is a client still talking.)
const SILENCE: std::time::Duration = std::time::Duration::from_secs(2 * crate::callbacks::LEASE.as_secs());

/// A socket that notes when it last read something.
struct Heard {
    socket: TcpStream,
    /// When a read last brought bytes, in ms since `since`.
    last_ms: Arc<std::sync::atomic::AtomicU64>,
    since: std::time::Instant,
}

impl tokio::io::AsyncRead for Heard {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.socket).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_ms.store(self.since.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Heard {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.socket).poll_write(cx, data)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// Wait until nothing was read from the socket for [`SILENCE`].
async fn silence(last_ms: &std::sync::atomic::AtomicU64, since: std::time::Instant) {
    loop {
        let now = since.elapsed().as_millis() as u64;
        let quiet = std::time::Duration::from_millis(now.saturating_sub(last_ms.load(std::sync::atomic::Ordering::Relaxed)));
        if quiet >= SILENCE {
            return;
        }
        tokio::time::sleep(SILENCE - quiet).await;
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_FRAME)).max_frame_size(Some(MAX_FRAME))
}

// The signature is tungstenite's handshake callback.
#[allow(clippy::result_large_err)]
fn check_path(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() == "/" {
        return Ok(resp);
    }
    let mut err = ErrorResponse::new(Some(format!("restfsd serves WebSocket on / only, not {}\n", req.uri().path())));
    *err.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
    Err(err)
}

fn frame(encoding: Encoding, bytes: Vec<u8>) -> Message {
    match encoding {
        Encoding::Json => Message::text(String::from_utf8(bytes).expect("JSON encoder writes UTF-8")),
        Encoding::Bson => Message::binary(bytes),
    }
}

async fn connection(stream: TcpStream, service: Arc<Service>) -> Result<(), WsError> {
    let (last_read, since) = (Arc::new(std::sync::atomic::AtomicU64::new(0)), std::time::Instant::now());
    let stream = Heard { socket: stream, last_ms: last_read.clone(), since };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(ws_config())).await?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<(Encoding, Vec<u8>)>(1024);
    let close_with: Arc<std::sync::Mutex<Option<CloseFrame>>> = Arc::default();
    let close_frame = close_with.clone();
    let writer = tokio::spawn(async move {
        while let Some((encoding, bytes)) = rx.recv().await {
            if sink.send(frame(encoding, bytes)).await.is_err() {
                return;
            }
        }
        let close = close_frame.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = sink.send(Message::Close(close)).await;
        let _ = sink.close().await;
    });
    let mut closing = service.closing();
    let session = Session::new(service.clone(), tx.clone());
    let result = loop {
        let lease = session.lease();
        let revoked = async {
            match &lease {
                Some(l) if !l.is_revoked() => l.revocation.notified().await,
                Some(_) => {}
                None => std::future::pending().await,
            }
        };
        let silent = async {
            match &lease {
                Some(_) => silence(&last_read, since).await,
                None => std::future::pending().await,
            }
        };
        // In this order: after a pause of the server itself (a frozen VM),
        // what its clients sent meanwhile is read before their silence counts.
        let next = tokio::select! {
            biased;
            _ = closing.changed() => break Ok(()),
            n = source.next() => n,
            _ = revoked => break Ok(()),
            _ = session.replaced() => break Ok(()),
            _ = silent => {
                tracing::info!("closing a client's connection: silent for {SILENCE:?}");
                break Ok(());
            }
        };
        session.heard();
        if session.lease().is_some_and(|l| l.is_revoked()) {
            break Ok(());
        }
        let (encoding, bytes) = match next {
            Some(Ok(Message::Text(t))) => (Encoding::Json, t.as_bytes().to_vec()),
            Some(Ok(Message::Binary(b))) => (Encoding::Bson, b.to_vec()),
            Some(Ok(Message::Close(_))) | None => break Ok(()),
            Some(Ok(_)) => continue, // ping/pong are answered by tungstenite
            Some(Err(WsError::Capacity(e))) => {
                let err = RpcError::new(code::FRAME_TOO_LARGE, format!("frame too large ({e}); the limit is {MAX_FRAME} bytes"));
                let _ = tx.send((Encoding::Json, encode_response::<()>(Encoding::Json, None, &Err(err)))).await;
                *close_with.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(CloseFrame { code: CloseCode::Size, reason: "frame too large".into() });
                break Ok(());
            }
            Some(Err(e)) => break Err(e),
        };
        let split = match split_frame(encoding, &bytes) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send((encoding, encode_response::<()>(encoding, None, &Err(e)))).await;
                continue;
            }
        };
        let (session, tx, service) = (session.clone(), tx.clone(), service.clone());
        tokio::spawn(async move {
            let encoding = split.encoding;
            let (reply, bump) = service
                .deferring_bumps(async {
                    if split.batch {
                        let replies = futures_util::future::join_all(split.messages.into_iter().map(|m| session.clone().handle(m))).await;
                        let replies: Vec<Vec<u8>> = replies.into_iter().flatten().collect();
                        (!replies.is_empty()).then(|| encode_batch(encoding, &replies))
                    } else {
                        let mut last = None;
                        for m in split.messages {
                            last = session.clone().handle(m).await;
                        }
                        last
                    }
                })
                .await;
            // Other clients must have applied a change before it is answered
            // (callbacks); without any, the reply goes first, then the push.
            let waited = match bump {
                Some(b) => {
                    let waited = session.await_callbacks(b).await;
                    session.queue_earlier_pushes(b).await;
                    waited
                }
                None => false,
            };
            if let Some(reply) = reply {
                let _ = tx.send((encoding, reply)).await;
            }
            if let (Some(b), false) = (bump, waited) {
                service.bump(b);
            }
        });
    };
    session.close().await;
    drop(session);
    drop(tx);
    // The writer ends once in-flight handlers have sent their replies.
    let _ = writer.await;
    result
}
