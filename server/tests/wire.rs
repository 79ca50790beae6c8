//! Wire-level tests of restfsd: a real server started in-process, driven by a
//! raw WebSocket client, with assertions on the exact JSON-RPC envelopes it
//! sends back (codes from `restfs_proto::rpc::code`, errno names in
//! `error.data.errno`).
//!
//! Every test opens a bystander connection when the server starts and checks
//! at the end that it still answers, so no abuse of one connection may
//! disturb the others.

use bson::{Bson, Document, doc};
use futures_util::{SinkExt, StreamExt};
use restfs_proto::rpc::code;
use restfs_proto::{Bytes, Hash, MAX_FRAME};
use restfs_server::Server;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for any one answer.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long "no answer" is watched for.
const QUIET: Duration = Duration::from_millis(300);

static NEXT_ID: AtomicI64 = AtomicI64::new(1);

// --- fixture ---

/// A running server, its data directory, and a bystander connection.
struct Fixture {
    server: Server,
    data: tempfile::TempDir,
    bystander: Ws,
}

impl Fixture {
    async fn start() -> Fixture {
        let data = tempfile::tempdir().unwrap();
        let server = Server::start("127.0.0.1:0".parse().unwrap(), data.path()).await.expect("server starts");
        let mut bystander = connect(server.addr).await;
        ok(&mut bystander, "bucket.list", json!({})).await;
        Fixture { server, data, bystander }
    }

    async fn connect(&self) -> Ws {
        connect(self.server.addr).await
    }

    fn data(&self) -> &Path {
        self.data.path()
    }

    /// The connection opened at the start still answers; then stop.
    async fn finish(mut self) {
        let r = ok(&mut self.bystander, "bucket.list", json!({})).await;
        assert!(r["buckets"].is_array(), "{r}");
        self.server.shutdown().await.unwrap();
    }
}

async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.expect("WebSocket upgrade on /");
    ws
}

// --- frames ---

/// The next data or close frame on `ws` (pings and pongs skipped).
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let m =
            tokio::time::timeout(TIMEOUT, ws.next()).await.expect("no frame in time").expect("connection ended").expect("WebSocket error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("the answer is JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// Send a text frame; the next text frame, parsed.
async fn raw(ws: &mut Ws, text: &str) -> Value {
    send_text(ws, text).await;
    next_json(ws).await
}

/// Nothing arrives on `ws` for [`QUIET`].
async fn assert_silent(ws: &mut Ws) {
    if let Ok(m) = tokio::time::timeout(QUIET, ws.next()).await {
        panic!("expected no frame, got {m:?}");
    }
}

// --- calls ---

/// Call `method` with a fresh id; the whole response, whose id is checked.
async fn request(ws: &mut Ws, method: &str, params: Value) -> Value {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let resp = raw(ws, &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()).await;
    assert_eq!(resp["jsonrpc"], "2.0", "{resp}");
    assert_eq!(resp["id"], id, "the answer must name its request: {resp}");
    resp
}

/// Call `method`, which must succeed; its result.
async fn ok(ws: &mut Ws, method: &str, params: Value) -> Value {
    let resp = request(ws, method, params).await;
    assert!(resp.get("error").is_none(), "{method} failed: {resp}");
    resp.get("result").unwrap_or_else(|| panic!("{method}: no result in {resp}")).clone()
}

/// Call `method`, which must fail with a filesystem error; its errno name.
async fn fs_error(ws: &mut Ws, method: &str, params: Value) -> String {
    let resp = request(ws, method, params).await;
    assert_eq!(resp["error"]["code"], code::FS_ERROR, "{method}: {resp}");
    assert!(resp.get("result").is_none(), "{resp}");
    resp["error"]["data"]["errno"].as_str().unwrap_or_else(|| panic!("{method}: no errno in {resp}")).to_string()
}

/// `resp` is a JSON-RPC error with `code`, answering id `id`.
#[track_caller]
fn assert_error(resp: &Value, code: i64, id: Value) {
    assert_eq!(resp["jsonrpc"], "2.0", "{resp}");
    assert_eq!(resp["error"]["code"], code, "{resp}");
    assert!(resp["error"]["message"].is_string(), "{resp}");
    assert!(resp.get("result").is_none(), "{resp}");
    assert_eq!(resp.get("id"), Some(&id), "{resp}");
}

/// hello, bucket.create and bucket.mount of a fresh bucket `name`.
async fn mount_new(ws: &mut Ws, name: &str) {
    ok(ws, "hello", json!({"versions": [1], "encodings": ["json"]})).await;
    ok(ws, "bucket.create", json!({"name": name})).await;
    let m = ok(ws, "bucket.mount", json!({"name": name})).await;
    assert_eq!(m["root"]["ino"], 1, "{m}");
}

/// Names in the root directory, as JSON (a string, or an array of bytes).
async fn root_names(ws: &mut Ws) -> Vec<Value> {
    let l = ok(ws, "fs.readdir", json!({"ino": 1, "limit": 1000})).await;
    assert_eq!(l["more"], false);
    l["entries"].as_array().unwrap().iter().map(|e| e["name"].clone()).collect()
}

fn b64(data: &[u8]) -> Value {
    serde_json::to_value(Bytes(data.to_vec())).unwrap()
}

fn unb64(v: &Value) -> Vec<u8> {
    serde_json::from_value::<Bytes>(v.clone()).expect("base64 bytes").0
}

/// Where the directory block store keeps a block.
fn block_path(data: &Path, h: &Hash) -> PathBuf {
    let hex = h.to_hex();
    data.join("blocks").join(&hex[0..2]).join(&hex[2..4]).join(hex)
}

// --- BSON ---

/// Send `doc` as a binary frame; the binary answer, decoded.
async fn bson_call(ws: &mut Ws, doc: &Document) -> Document {
    ws.send(Message::binary(bson::serialize_to_vec(doc).unwrap())).await.unwrap();
    bson_answer(ws).await
}

async fn bson_answer(ws: &mut Ws) -> Document {
    match next_frame(ws).await {
        Message::Binary(b) => bson::deserialize_from_slice(&b).expect("the answer is BSON"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

fn bson_int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int32(i)) => *i as i64,
        Some(Bson::Int64(i)) => *i,
        other => panic!("{key}: expected an integer, got {other:?} in {d}"),
    }
}

fn bson_error_code(d: &Document) -> i64 {
    bson_int(d.get_document("error").unwrap_or_else(|_| panic!("no error in {d}")), "code")
}

// --- envelopes ---

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_parse_error() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    for bad in ["{nope", r#"{"jsonrpc":"2.0","id":1,"method":"bucket.list""#, "", "[1,", "}"] {
        let resp = raw(&mut ws, bad).await;
        assert_error(&resp, code::PARSE_ERROR, Value::Null);
    }
    // The connection is still usable.
    ok(&mut ws, "bucket.list", json!({})).await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_method_echoes_the_id() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":42,"method":"no.such.method","params":{}}"#).await;
    assert_error(&resp, code::METHOD_NOT_FOUND, json!(42));
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":"abc","method":"fs.nope"}"#).await;
    assert_error(&resp, code::METHOD_NOT_FOUND, json!("abc"));
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":-7,"method":""}"#).await;
    assert_error(&resp, code::METHOD_NOT_FOUND, json!(-7));
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_param_types_are_invalid_params() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let cases = [
        (1, r#"{"jsonrpc":"2.0","id":1,"method":"bucket.create","params":{"name":5}}"#),
        (2, r#"{"jsonrpc":"2.0","id":2,"method":"fs.lookup","params":{"parent":"x","name":"a"}}"#),
        (3, r#"{"jsonrpc":"2.0","id":3,"method":"hello","params":{"versions":"1","encodings":["json"]}}"#),
        (4, r#"{"jsonrpc":"2.0","id":4,"method":"bucket.stat","params":[1,2]}"#),
        (5, r#"{"jsonrpc":"2.0","id":5,"method":"bucket.stat","params":{}}"#),
        (6, r#"{"jsonrpc":"2.0","id":6,"method":"block.get","params":{"hash":"not hex"}}"#),
        (7, r#"{"jsonrpc":"2.0","id":7,"method":"fs.getattr","params":{"ino":-1}}"#),
        (8, r#"{"jsonrpc":"2.0","id":8,"method":"bucket.list","params":{"unexpected":true}}"#),
        (9, r#"{"jsonrpc":"2.0","id":9,"method":"bucket.list","params":"x"}"#),
    ];
    for (id, text) in cases {
        let resp = raw(&mut ws, text).await;
        assert_error(&resp, code::INVALID_PARAMS, json!(id));
    }
    ok(&mut ws, "bucket.list", json!({})).await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    // Ids must be strings or integers; an invalid id is answered with null.
    for id in ["1.5", r#"{"a":1}"#, "true", "[1]", "18446744073709551615"] {
        let resp = raw(&mut ws, &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"bucket.list"}}"#)).await;
        assert_error(&resp, code::INVALID_REQUEST, Value::Null);
    }
    // A request without "jsonrpc", with the wrong version, without a method,
    // or that is no object at all.
    for text in [
        r#"{"id":3,"method":"bucket.list"}"#,
        r#"{"jsonrpc":"1.0","id":3,"method":"bucket.list"}"#,
        r#"{"jsonrpc":2,"id":3,"method":"bucket.list"}"#,
        r#"{"jsonrpc":"2.0","id":3}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":5}"#,
        "5",
        r#""bucket.list""#,
        "null",
    ] {
        let resp = raw(&mut ws, text).await;
        assert_eq!(resp["error"]["code"], code::INVALID_REQUEST, "{text}: {resp}");
        assert!(resp["id"] == json!(3) || resp["id"].is_null(), "{text}: {resp}");
        assert!(resp.get("result").is_none());
    }
    // A null id is allowed (if discouraged) and echoed.
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":null,"method":"bucket.list"}"#).await;
    assert_eq!(resp.get("id"), Some(&Value::Null), "{resp}");
    assert!(resp["result"]["buckets"].is_array(), "{resp}");
    ok(&mut ws, "bucket.list", json!({})).await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_get_no_answer() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    send_text(&mut ws, r#"{"jsonrpc":"2.0","method":"bucket.list","params":{}}"#).await;
    send_text(&mut ws, r#"{"jsonrpc":"2.0","method":"no.such.method"}"#).await;
    send_text(&mut ws, r#"{"jsonrpc":"2.0","method":"bucket.stat","params":{"name":5}}"#).await;
    send_text(&mut ws, r#"{"jsonrpc":"2.0","method":"fs.getattr","params":{"ino":1}}"#).await;
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":9,"method":"bucket.list"}"#).await;
    assert_eq!(resp["id"], 9, "the first answer is the request's: {resp}");
    assert!(resp["result"]["buckets"].is_array());
    assert_silent(&mut ws).await;

    // A notification is still carried out (frames run concurrently, so wait for it).
    send_text(&mut ws, r#"{"jsonrpc":"2.0","method":"bucket.create","params":{"name":"made-by-notification"}}"#).await;
    assert_silent(&mut ws).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let resp = request(&mut ws, "bucket.stat", json!({"name": "made-by-notification"})).await;
        if resp["result"]["name"] == "made-by-notification" {
            break;
        }
        assert_eq!(resp["error"]["data"]["errno"], "ENOENT", "{resp}");
        assert!(tokio::time::Instant::now() < deadline, "the notification was never carried out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let batch = r#"[
        {"jsonrpc":"2.0","id":1,"method":"bucket.list","params":{}},
        {"jsonrpc":"2.0","id":"two","method":"no.such.method"},
        {"jsonrpc":"2.0","method":"bucket.list"},
        {"jsonrpc":"2.0","id":3,"method":"bucket.stat","params":{"name":7}},
        {"jsonrpc":"2.0","id":4,"method":"bucket.stat","params":{"name":"missing"}},
        5,
        {"jsonrpc":"2.0","id":1.5,"method":"bucket.list"}
    ]"#;
    let resp = raw(&mut ws, batch).await;
    let answers = resp.as_array().unwrap_or_else(|| panic!("a batch gets an array: {resp}"));
    assert_eq!(answers.len(), 6, "one answer per non-notification: {resp}");
    let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).unwrap_or_else(|| panic!("no answer for {id}: {resp}"));
    assert!(by_id(json!(1))["result"]["buckets"].is_array());
    assert_eq!(by_id(json!("two"))["error"]["code"], code::METHOD_NOT_FOUND);
    assert_eq!(by_id(json!(3))["error"]["code"], code::INVALID_PARAMS);
    assert_eq!(by_id(json!(4))["error"]["code"], code::FS_ERROR);
    assert_eq!(by_id(json!(4))["error"]["data"]["errno"], "ENOENT");
    let nulls: Vec<&Value> = answers.iter().filter(|a| a["id"].is_null()).collect();
    assert_eq!(nulls.len(), 2, "{resp}");
    assert!(nulls.iter().all(|a| a["error"]["code"] == code::INVALID_REQUEST), "{resp}");

    // A batch of notifications only gets no answer at all.
    send_text(&mut ws, r#"[{"jsonrpc":"2.0","method":"bucket.list"},{"jsonrpc":"2.0","method":"nope"}]"#).await;
    let resp = raw(&mut ws, r#"{"jsonrpc":"2.0","id":11,"method":"bucket.list"}"#).await;
    assert_eq!(resp["id"], 11, "{resp}");
    assert_silent(&mut ws).await;

    // An empty batch is one invalid request.
    let resp = raw(&mut ws, "[]").await;
    assert!(resp.is_object(), "{resp}");
    assert_error(&resp, code::INVALID_REQUEST, Value::Null);
    let resp = raw(&mut ws, " [ ] ").await;
    assert_error(&resp, code::INVALID_REQUEST, Value::Null);

    // A batch of one is still a batch.
    let resp = raw(&mut ws, r#"[{"jsonrpc":"2.0","id":12,"method":"bucket.list"}]"#).await;
    assert_eq!(resp.as_array().map(|a| a.len()), Some(1), "{resp}");
    assert_eq!(resp[0]["id"], 12);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bson_frames() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 7_i64, "method": "bucket.list", "params": {}}).await;
    assert_eq!(resp.get_str("jsonrpc").unwrap(), "2.0");
    assert_eq!(bson_int(&resp, "id"), 7);
    assert!(resp.get_document("result").unwrap().get_array("buckets").is_ok(), "{resp}");

    let hello = doc! {"jsonrpc": "2.0", "id": "h", "method": "hello", "params": {"versions": [1], "encodings": ["bson", "json"]}};
    let resp = bson_call(&mut ws, &hello).await;
    assert_eq!(resp.get_str("id").unwrap(), "h");
    assert_eq!(resp.get_document("result").unwrap().get_str("encoding").unwrap(), "bson");

    // Errors come back in BSON too.
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 8_i32, "method": "nope"}).await;
    assert_eq!((bson_error_code(&resp), bson_int(&resp, "id")), (code::METHOD_NOT_FOUND, 8));
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 9_i32, "method": "bucket.stat", "params": {"name": 1_i32}}).await;
    assert_eq!(bson_error_code(&resp), code::INVALID_PARAMS);
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 1.5_f64, "method": "bucket.list"}).await;
    assert_eq!(bson_error_code(&resp), code::INVALID_REQUEST);
    assert_eq!(resp.get("id"), Some(&Bson::Null));

    // Block payloads travel as BSON binary.
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let h = Hash::of(&data);
    let put = doc! {"jsonrpc": "2.0", "id": 10_i32, "method": "block.put", "params": {
        "blocks": [{"hash": h.to_hex(), "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: data.clone() }}]
    }};
    let resp = bson_call(&mut ws, &put).await;
    assert!(resp.get("error").is_none(), "{resp}");
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 11_i32, "method": "block.get", "params": {"hash": h.to_hex()}}).await;
    assert_eq!(resp.get_document("result").unwrap().get_binary_generic("data").unwrap(), &data);

    // A BSON batch: a document keyed "0", "1", …
    let batch = doc! {
        "0": {"jsonrpc": "2.0", "id": 20_i32, "method": "bucket.list"},
        "1": {"jsonrpc": "2.0", "id": 21_i32, "method": "nope"},
    };
    let resp = bson_call(&mut ws, &batch).await;
    let answers: Vec<&Document> = resp.values().map(|v| v.as_document().expect("batch answers are documents")).collect();
    assert_eq!(answers.len(), 2, "{resp}");
    let ok20 = answers.iter().find(|a| bson_int(a, "id") == 20).unwrap();
    assert!(ok20.get_document("result").is_ok());
    let err21 = answers.iter().find(|a| bson_int(a, "id") == 21).unwrap();
    assert_eq!(bson_error_code(err21), code::METHOD_NOT_FOUND);

    // Garbage in a binary frame is a parse error, answered in BSON.
    for garbage in [&b"\x05\x00\x00"[..], b"not bson at all", &[0xff; 64], b"\x10\x00\x00\x00\x02a\x00\xff\xff\xff\x7fxx\x00"] {
        ws.send(Message::binary(garbage.to_vec())).await.unwrap();
        let resp = bson_answer(&mut ws).await;
        assert_eq!(bson_error_code(&resp), code::PARSE_ERROR, "{garbage:?}");
        assert_eq!(resp.get("id"), Some(&Bson::Null));
    }

    // Text and binary mix on one connection.
    ok(&mut ws, "bucket.list", json!({})).await;
    let resp = bson_call(&mut ws, &doc! {"jsonrpc": "2.0", "id": 30_i32, "method": "bucket.list"}).await;
    assert_eq!(bson_int(&resp, "id"), 30);
    fx.finish().await;
}

// --- limits and the front door ---

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frame_closes_only_that_connection() {
    let fx = Fixture::start().await;
    let mut other = fx.connect().await;
    ok(&mut other, "bucket.list", json!({})).await;

    // Exactly MAX_FRAME bytes are fine.
    let mut ws = fx.connect().await;
    let mut text = r#"{"jsonrpc":"2.0","id":77,"method":"bucket.list"}"#.to_string();
    text.extend(std::iter::repeat_n(' ', MAX_FRAME - text.len()));
    assert_eq!(text.len(), MAX_FRAME);
    let resp = raw(&mut ws, &text).await;
    assert_eq!(resp["id"], 77, "{resp}");
    assert!(resp["result"]["buckets"].is_array());

    // One byte more is answered with FRAME_TOO_LARGE, then the connection closes.
    text.push(' ');
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        // The server stops reading after the frame header: this send may fail.
        let _ = sink.send(Message::text(text)).await;
    });
    let resp = match tokio::time::timeout(TIMEOUT, stream.next()).await.expect("an answer in time") {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(t.as_str()).unwrap(),
        other => panic!("expected the FRAME_TOO_LARGE answer, got {other:?}"),
    };
    assert_error(&resp, code::FRAME_TOO_LARGE, Value::Null);
    match tokio::time::timeout(TIMEOUT, stream.next()).await.expect("the connection closes in time") {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {}
        Some(Ok(m)) => panic!("unexpected frame after FRAME_TOO_LARGE: {m:?}"),
    }
    // Whatever the client still had to say, the stream is finished.
    let _ = tokio::time::timeout(TIMEOUT, sender).await.expect("the sender gives up");
    assert!(matches!(tokio::time::timeout(TIMEOUT, stream.next()).await.expect("closed"), None | Some(Err(_))));

    // Other connections, old and new, carry on.
    ok(&mut other, "bucket.list", json!({})).await;
    let mut fresh = fx.connect().await;
    ok(&mut fresh, "bucket.list", json!({})).await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_only_on_root_path() {
    let fx = Fixture::start().await;
    for path in ["/other", "/ws", "//", "/restfs/"] {
        match tokio_tungstenite::connect_async(format!("ws://{}{path}", fx.server.addr)).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404, "{path}"),
            Err(e) => panic!("{path}: expected an HTTP refusal, got {e}"),
            Ok(_) => panic!("{path}: the upgrade must be refused"),
        }
    }
    let mut ws = fx.connect().await;
    ok(&mut ws, "bucket.list", json!({})).await;
    fx.finish().await;
}

// --- filesystem errors over the wire ---

#[tokio::test(flavor = "multi_thread")]
async fn invalid_names_are_refused() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    mount_new(&mut ws, "names").await;
    let src = ok(&mut ws, "fs.create", json!({"parent": 1, "name": "src", "mode": 0o644, "uid": 0, "gid": 0})).await;
    let src_ino = src["ino"].as_u64().unwrap();

    let long = "a".repeat(256);
    let cases: Vec<(Value, &str)> = vec![
        (json!("a/b"), "EINVAL"),
        (json!("/"), "EINVAL"),
        (json!("a\u{0}b"), "EINVAL"),
        (json!([97, 0, 98]), "EINVAL"),
        (json!(".."), "EINVAL"),
        (json!("."), "EINVAL"),
        (json!([46, 46]), "EINVAL"),
        (json!(""), "EINVAL"),
        (json!(long), "ENAMETOOLONG"),
        (json!(vec![0xffu8; 256]), "ENAMETOOLONG"),
    ];
    for (name, want) in &cases {
        let calls = [
            ("fs.mkdir", json!({"parent": 1, "name": name, "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0})),
            ("fs.create", json!({"parent": 1, "name": name, "mode": 0o644, "uid": 0, "gid": 0})),
            ("fs.mknod", json!({"parent": 1, "name": name, "kind": "fifo", "mode": 0o644, "uid": 0, "gid": 0})),
            ("fs.symlink", json!({"parent": 1, "name": name, "target": "src", "uid": 0, "gid": 0})),
            ("fs.link", json!({"ino": src_ino, "parent": 1, "name": name})),
            ("fs.lookup", json!({"parent": 1, "name": name})),
            ("fs.unlink", json!({"parent": 1, "name": name})),
            ("fs.rmdir", json!({"parent": 1, "name": name})),
            ("fs.rename", json!({"parent": 1, "name": "src", "new_parent": 1, "new_name": name})),
            ("fs.rename", json!({"parent": 1, "name": name, "new_parent": 1, "new_name": "dst"})),
        ];
        for (method, params) in calls {
            assert_eq!(fs_error(&mut ws, method, params).await, *want, "{method} with name {name}");
        }
    }
    // Nothing was half-created, and the source is where it was.
    assert_eq!(root_names(&mut ws).await, vec![json!("src")]);
    let root = ok(&mut ws, "fs.getattr", json!({"ino": 1})).await;
    assert_eq!(root["nlink"], 2, "{root}");
    let src = ok(&mut ws, "fs.lookup", json!({"parent": 1, "name": "src"})).await;
    assert_eq!((src["ino"].as_u64(), src["nlink"].as_u64()), (Some(src_ino), Some(1)));

    // 255 bytes are fine, and names need not be UTF-8.
    let max = "b".repeat(255);
    ok(&mut ws, "fs.mkdir", json!({"parent": 1, "name": max, "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0})).await;
    ok(&mut ws, "fs.create", json!({"parent": 1, "name": [0xff, 0xfe], "mode": 0o644, "uid": 0, "gid": 0})).await;
    ok(&mut ws, "fs.lookup", json!({"parent": 1, "name": [0xff, 0xfe]})).await;
    assert_eq!(root_names(&mut ws).await, vec![json!(max), json!("src"), json!([0xff, 0xfe])]);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fs_calls_need_a_mount() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    ok(&mut ws, "hello", json!({"versions": [1], "encodings": ["json"]})).await;
    ok(&mut ws, "bucket.create", json!({"name": "unmounted"})).await;
    let calls = [
        ("fs.getattr", json!({"ino": 1})),
        ("fs.lookup", json!({"parent": 1, "name": "x"})),
        ("fs.readdir", json!({"ino": 1, "limit": 10})),
        ("fs.create", json!({"parent": 1, "name": "x", "mode": 0o644, "uid": 0, "gid": 0})),
        ("fs.mkdir", json!({"parent": 1, "name": "x", "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0})),
        ("fs.open", json!({"ino": 1})),
        ("fs.statfs", json!({})),
        ("seg.get", json!({"ino": 1, "segment": 0})),
        ("seg.commit", json!({"ino": 1, "size": 0, "slots": []})),
    ];
    for (method, params) in calls {
        assert_eq!(fs_error(&mut ws, method, params).await, "ENOTCONN", "{method}");
    }
    assert_eq!(fs_error(&mut ws, "bucket.mount", json!({"name": "no-such-bucket"})).await, "ENOENT");
    assert_eq!(fs_error(&mut ws, "fs.getattr", json!({"ino": 1})).await, "ENOTCONN", "a failed mount mounts nothing");
    // A mount on one connection is not a mount on another.
    ok(&mut ws, "bucket.mount", json!({"name": "unmounted"})).await;
    ok(&mut ws, "fs.getattr", json!({"ino": 1})).await;
    let mut other = fx.connect().await;
    assert_eq!(fs_error(&mut other, "fs.getattr", json!({"ino": 1})).await, "ENOTCONN");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_put_checks_the_hash() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let data = b"the real content".to_vec();
    let claimed = Hash::of(b"something else");
    let put = json!({"blocks": [{"hash": claimed.to_hex(), "data": b64(&data)}]});
    assert_eq!(fs_error(&mut ws, "block.put", put).await, "EINVAL");
    let has = ok(&mut ws, "block.has", json!({"hashes": [claimed.to_hex(), Hash::of(&data).to_hex()]})).await;
    assert_eq!(has["present"], json!([false, false]), "a refused block is stored under no name");
    assert_eq!(fs_error(&mut ws, "block.get", json!({"hash": claimed.to_hex()})).await, "ENOENT");

    // A large mismatching block leaves nothing in the block store either.
    let big = vec![3u8; 100 << 10];
    let wrong = Hash::of(&big[1..]);
    assert_eq!(fs_error(&mut ws, "block.put", json!({"blocks": [{"hash": wrong.to_hex(), "data": b64(&big)}]})).await, "EINVAL");
    assert!(!block_path(fx.data(), &wrong).exists() && !block_path(fx.data(), &Hash::of(&big)).exists());

    // One bad block in a put: the good one before it may land, the bad one never.
    let good = b"good".to_vec();
    let put = json!({"blocks": [{"hash": Hash::of(&good).to_hex(), "data": b64(&good)}, {"hash": claimed.to_hex(), "data": b64(&data)}]});
    assert_eq!(fs_error(&mut ws, "block.put", put).await, "EINVAL");
    let has = ok(&mut ws, "block.has", json!({"hashes": [claimed.to_hex()]})).await;
    assert_eq!(has["present"], json!([false]));
    fx.finish().await;
}

// --- the whole way through ---

#[tokio::test(flavor = "multi_thread")]
async fn happy_path() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    let hello = ok(&mut ws, "hello", json!({"versions": [1], "encodings": ["json"], "client": "wire test"})).await;
    assert_eq!(hello["version"], 1);
    assert_eq!(hello["encoding"], "json");
    assert_eq!(hello["max_frame"], MAX_FRAME as u64);
    assert_eq!(fs_error(&mut ws, "hello", json!({"versions": [99], "encodings": ["json"]})).await, "EPROTO");

    let info = ok(&mut ws, "bucket.create", json!({"name": "happy"})).await;
    assert_eq!(info["name"], "happy");
    let block_size = info["block_size"].as_u64().unwrap();
    assert_eq!(fs_error(&mut ws, "bucket.create", json!({"name": "happy"})).await, "EEXIST");
    let listed = ok(&mut ws, "bucket.list", json!({})).await;
    assert!(listed["buckets"].as_array().unwrap().iter().any(|b| b["name"] == "happy"));
    let mount = ok(&mut ws, "bucket.mount", json!({"name": "happy"})).await;
    assert_eq!((mount["bucket"]["name"].as_str(), mount["root"]["kind"].as_str()), (Some("happy"), Some("dir")));

    let f = ok(&mut ws, "fs.create", json!({"parent": 1, "name": "file", "mode": 0o644, "uid": 1000, "gid": 1000})).await;
    let ino = f["ino"].as_u64().unwrap();
    assert_eq!((f["kind"].as_str(), f["size"].as_u64(), f["nlink"].as_u64()), (Some("file"), Some(0), Some(1)));

    // A 100 KiB block (block store) and a 10-byte one (inline).
    let big: Vec<u8> = (0..100u32 << 10).map(|i| (i % 251) as u8).collect();
    let small = b"ten bytes!".to_vec();
    let (hb, hs) = (Hash::of(&big), Hash::of(&small));
    let has = ok(&mut ws, "block.has", json!({"hashes": [hb.to_hex(), hs.to_hex()]})).await;
    assert_eq!(has["present"], json!([false, false]));
    let put = json!({"blocks": [{"hash": hb.to_hex(), "data": b64(&big)}, {"hash": hs.to_hex(), "data": b64(&small)}]});
    ok(&mut ws, "block.put", put).await;
    let has = ok(&mut ws, "block.has", json!({"hashes": [hb.to_hex(), hs.to_hex()]})).await;
    assert_eq!(has["present"], json!([true, true]));
    assert!(block_path(fx.data(), &hb).exists(), "the big block lives in the block store");
    assert!(!block_path(fx.data(), &hs).exists(), "the small block is kept inline");

    let size = block_size + small.len() as u64;
    let commit = json!({"ino": ino, "size": size, "slots": [
        {"index": 0, "block": [hb.to_hex(), big.len()]},
        {"index": 1, "block": [hs.to_hex(), small.len()]},
    ]});
    let attr = ok(&mut ws, "seg.commit", commit).await;
    assert_eq!(attr["size"], size);
    assert_eq!(attr["version"], f["version"].as_u64().unwrap() + 1);

    let seg = ok(&mut ws, "seg.get", json!({"ino": ino, "segment": 0})).await;
    assert_eq!(seg["version"], attr["version"]);
    assert_eq!(
        seg["blocks"],
        json!([
            {"index": 0, "hash": hb.to_hex(), "len": big.len()},
            {"index": 1, "hash": hs.to_hex(), "len": small.len()},
        ])
    );
    assert_eq!(ok(&mut ws, "seg.get", json!({"ino": ino, "segment": 1})).await["blocks"], json!([]));
    for (h, data) in [(hb, &big), (hs, &small)] {
        let got = ok(&mut ws, "block.get", json!({"hash": h.to_hex()})).await;
        assert_eq!(&unb64(&got["data"]), data, "block.get round trip");
    }
    let stat = ok(&mut ws, "bucket.stat", json!({"name": "happy"})).await;
    assert_eq!((stat["objects"].as_u64(), stat["bytes"].as_u64()), (Some(2), Some(size)));
    ok(&mut ws, "fs.sync", json!({})).await;

    // Referenced blocks survive garbage collection.
    let gc = ok(&mut ws, "admin.gc", json!({"min_age_secs": 0})).await;
    assert_eq!(gc["blocks_removed"], 0, "{gc}");

    // Unlinked while open: still there until released.
    ok(&mut ws, "fs.unlink", json!({"parent": 1, "name": "file"})).await;
    assert_eq!(fs_error(&mut ws, "fs.lookup", json!({"parent": 1, "name": "file"})).await, "ENOENT");
    let orphan = ok(&mut ws, "fs.getattr", json!({"ino": ino})).await;
    assert_eq!(orphan["nlink"], 0);
    assert_eq!(ok(&mut ws, "seg.get", json!({"ino": ino, "segment": 0})).await["blocks"].as_array().map(|b| b.len()), Some(2));
    ok(&mut ws, "fs.release", json!({"ino": ino})).await;
    assert_eq!(fs_error(&mut ws, "fs.getattr", json!({"ino": ino})).await, "ENOENT");
    assert_eq!(fs_error(&mut ws, "fs.release", json!({"ino": ino})).await, "EBADF");

    let gc = ok(&mut ws, "admin.gc", json!({"min_age_secs": 0})).await;
    assert!(gc["blocks_removed"].as_u64().unwrap() >= 2, "{gc}");
    assert!(gc["bytes_removed"].as_u64().unwrap() >= (big.len() + small.len()) as u64, "{gc}");
    let has = ok(&mut ws, "block.has", json!({"hashes": [hb.to_hex(), hs.to_hex()]})).await;
    assert_eq!(has["present"], json!([false, false]));
    assert!(!block_path(fx.data(), &hb).exists(), "collected blocks leave the block store");
    assert_eq!(fs_error(&mut ws, "block.get", json!({"hash": hb.to_hex()})).await, "ENOENT");

    assert!(root_names(&mut ws).await.is_empty());
    ok(&mut ws, "bucket.delete", json!({"name": "happy"})).await;
    assert_eq!(fs_error(&mut ws, "bucket.stat", json!({"name": "happy"})).await, "ENOENT");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bucket_arguments_are_checked() {
    let fx = Fixture::start().await;
    let mut ws = fx.connect().await;
    for name in ["", ".hidden", "a/b", "a b", "snow\u{2603}", &"x".repeat(64)] {
        assert_eq!(fs_error(&mut ws, "bucket.create", json!({"name": name})).await, "EINVAL", "bucket name {name:?}");
    }
    for block_size in [0, 1000, 4095, 2048, 3 << 20, 16 << 20] {
        assert_eq!(
            fs_error(&mut ws, "bucket.create", json!({"name": "b", "block_size": block_size})).await,
            "EINVAL",
            "block size {block_size}"
        );
    }
    for segment_blocks in [0, 1025] {
        assert_eq!(fs_error(&mut ws, "bucket.create", json!({"name": "b", "segment_blocks": segment_blocks})).await, "EINVAL");
    }
    assert!(ok(&mut ws, "bucket.list", json!({})).await["buckets"].as_array().unwrap().is_empty(), "nothing was created");
    let info = ok(&mut ws, "bucket.create", json!({"name": "Ok_name-1.x", "block_size": 4096, "segment_blocks": 1024})).await;
    assert_eq!((info["block_size"].as_u64(), info["segment_blocks"].as_u64()), (Some(4096), Some(1024)));
    ok(&mut ws, "bucket.mount", json!({"name": "Ok_name-1.x"})).await;
    ok(&mut ws, "fs.create", json!({"parent": 1, "name": "f", "mode": 0o644, "uid": 0, "gid": 0})).await;
    assert_eq!(fs_error(&mut ws, "bucket.delete", json!({"name": "Ok_name-1.x"})).await, "ENOTEMPTY");
    ok(&mut ws, "bucket.delete", json!({"name": "Ok_name-1.x", "force": true})).await;
    assert_eq!(fs_error(&mut ws, "bucket.delete", json!({"name": "Ok_name-1.x"})).await, "ENOENT");
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnect_releases_open_files() {
    let fx = Fixture::start().await;
    let mut a = fx.connect().await;
    mount_new(&mut a, "opens").await;
    let mut b = fx.connect().await;
    ok(&mut b, "bucket.mount", json!({"name": "opens"})).await;

    let f = ok(&mut a, "fs.create", json!({"parent": 1, "name": "f", "mode": 0o644, "uid": 0, "gid": 0})).await;
    let ino = f["ino"].as_u64().unwrap();
    let data = b"held open".to_vec();
    let h = Hash::of(&data);
    ok(&mut a, "block.put", json!({"blocks": [{"hash": h.to_hex(), "data": b64(&data)}]})).await;
    ok(&mut a, "seg.commit", json!({"ino": ino, "size": data.len(), "slots": [{"index": 0, "block": [h.to_hex(), data.len()]}]})).await;
    // b opens it too, then a unlinks it: both opens keep it.
    ok(&mut b, "fs.open", json!({"ino": ino})).await;
    ok(&mut a, "fs.unlink", json!({"parent": 1, "name": "f"})).await;
    assert_eq!(ok(&mut b, "fs.getattr", json!({"ino": ino})).await["nlink"], 0);
    assert_eq!(fs_error(&mut a, "fs.release", json!({"ino": 999})).await, "EBADF");

    // b's release leaves a's open; a's disconnect drops the last one.
    ok(&mut b, "fs.release", json!({"ino": ino})).await;
    assert_eq!(ok(&mut b, "fs.getattr", json!({"ino": ino})).await["nlink"], 0);
    assert_eq!(ok(&mut b, "admin.gc", json!({"min_age_secs": 0})).await["blocks_removed"], 0, "the open file still holds its block");
    a.close(None).await.unwrap();
    drop(a);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let resp = request(&mut b, "fs.getattr", json!({"ino": ino})).await;
        if resp["error"]["data"]["errno"] == "ENOENT" {
            break;
        }
        assert_eq!(resp["result"]["nlink"], 0, "{resp}");
        assert!(tokio::time::Instant::now() < deadline, "closing the connection never released the file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ok(&mut b, "admin.gc", json!({"min_age_secs": 0})).await["blocks_removed"], 1);
    assert_eq!(ok(&mut b, "block.has", json!({"hashes": [h.to_hex()]})).await["present"], json!([false]));
    fx.finish().await;
}

/// A create sent again on a new connection (its answer was lost with the
/// old one) is answered from the replay cache, and still holds the file open.
#[tokio::test]
async fn a_replayed_create_holds_its_file_open() {
    let fx = Fixture::start().await;
    let hello = json!({"versions": [1], "encodings": ["json"], "client_id": "replaying client"});
    let create = json!({"jsonrpc": "2.0", "id": "create-1", "method": "fs.create",
        "params": {"parent": 1, "name": "f", "mode": 0o644, "uid": 0, "gid": 0}});
    let mut a = fx.connect().await;
    ok(&mut a, "hello", hello.clone()).await;
    ok(&mut a, "bucket.create", json!({"name": "replay"})).await;
    ok(&mut a, "bucket.mount", json!({"name": "replay"})).await;
    let first = raw(&mut a, &create.to_string()).await;
    let ino = first["result"]["ino"].as_u64().unwrap_or_else(|| panic!("{first}"));
    a.close(None).await.unwrap();
    drop(a);

    let mut b = fx.connect().await;
    ok(&mut b, "hello", json!({"versions": [1], "encodings": ["json"]})).await;
    ok(&mut b, "bucket.mount", json!({"name": "replay"})).await;

    let mut a = fx.connect().await;
    ok(&mut a, "hello", hello).await;
    ok(&mut a, "bucket.mount", json!({"name": "replay"})).await;
    let again = raw(&mut a, &create.to_string()).await;
    assert_eq!(again["result"]["ino"], ino, "answered from the replay cache: {again}");
    // Removed elsewhere, the file stays while the replayed create holds it.
    ok(&mut b, "fs.unlink", json!({"parent": 1, "name": "f"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ok(&mut b, "fs.getattr", json!({"ino": ino})).await["nlink"], 0, "purged while open");
    ok(&mut a, "fs.release", json!({"ino": ino})).await;
    assert_eq!(fs_error(&mut b, "fs.getattr", json!({"ino": ino})).await, "ENOENT", "released, the file goes");
    fx.finish().await;
}

// --- delegation ---

/// Call `method` and wait for its answer, collecting the notifications
/// (pushes, recalls) that arrive first.
async fn call_noting(ws: &mut Ws, method: &str, params: Value, notes: &mut Vec<Value>) -> Value {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    send_text(ws, &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()).await;
    loop {
        let m = next_json(ws).await;
        if m.get("id") == Some(&json!(id)) {
            assert!(m.get("error").is_none(), "{method} failed: {m}");
            return m["result"].clone();
        }
        notes.push(m);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delegation_batches_apply_once_and_a_mount_recalls_it() {
    let fx = Fixture::start().await;
    let mut a = fx.connect().await;
    let mut notes = Vec::new();
    let hello = json!({"versions": [1], "encodings": ["json"], "capabilities": ["push", "callbacks"]});
    call_noting(&mut a, "hello", hello.clone(), &mut notes).await;
    call_noting(&mut a, "bucket.create", json!({"name": "deleg"}), &mut notes).await;
    call_noting(&mut a, "bucket.mount", json!({"name": "deleg"}), &mut notes).await;
    call_noting(&mut a, "bucket.subscribe", json!({}), &mut notes).await;
    let d = call_noting(&mut a, "fs.delegate", json!({"inos": 10}), &mut notes).await;
    assert_eq!((d["granted"].as_bool(), d["count"].as_u64()), (Some(true), Some(10)), "{d}");
    let ino = d["first"].as_u64().unwrap();

    let at = json!({"sec": 1_700_000_000, "nsec": 5});
    let ops = json!([
        {"mknod": {"at": at, "node": {"parent": 1, "name": "f", "kind": "file", "mode": 0o640, "uid": 7, "gid": 7, "ino": ino}}},
        {"rename": {"at": at, "rename": {"parent": 1, "name": "f", "new_parent": 1, "new_name": "g"}}},
    ]);
    let first = call_noting(&mut a, "fs.batch", json!({"ops": ops, "token": "tok-1"}), &mut notes).await;
    let outcomes = first["outcomes"].as_array().unwrap();
    assert_eq!(outcomes[0]["attr"]["ino"].as_u64(), Some(ino), "{first}");
    assert_eq!(outcomes[0]["attr"]["ctime"], at, "stamped with the holder's time: {first}");
    assert!(outcomes.iter().all(|o| o.get("error").is_none()), "{first}");
    // The same token again (a replay after a crash): answered, not applied twice.
    let again = call_noting(&mut a, "fs.batch", json!({"ops": ops, "token": "tok-1"}), &mut notes).await;
    assert_eq!(again, first);
    // Once the holder says it has the outcome, the server forgets it, so
    // the token is new again: the changes are applied again, and fail.
    let none = call_noting(&mut a, "fs.batch", json!({"ops": [], "token": "tok-2", "forget": ["tok-1"]}), &mut notes).await;
    assert_eq!(none["outcomes"], json!([]), "{none}");
    let twice = call_noting(&mut a, "fs.batch", json!({"ops": ops, "token": "tok-1"}), &mut notes).await;
    let errors: Vec<&str> =
        twice["outcomes"].as_array().unwrap().iter().map(|o| o["error"]["data"]["errno"].as_str().unwrap_or("-")).collect();
    assert_eq!(errors, ["EINVAL", "ENOENT"], "{twice}");
    // The holder's own changes come back as sequence numbers only.
    for n in notes.iter().filter(|n| n["method"] == "push.changes") {
        assert_eq!(n["params"]["changes"], json!([]), "{n}");
    }

    // Another mount waits until the holder returns the delegation.
    let addr = fx.server.addr;
    let newcomer = tokio::spawn(async move {
        let mut b = connect(addr).await;
        ok(&mut b, "hello", json!({"versions": [1], "encodings": ["json"]})).await;
        ok(&mut b, "bucket.mount", json!({"name": "deleg"})).await;
        let l = ok(&mut b, "fs.readdir", json!({"ino": 1, "limit": 100})).await;
        (b, l)
    });
    let recall = loop {
        let m = next_json(&mut a).await;
        if m["method"] == "fs.recall" {
            break m;
        }
    };
    assert!(recall.get("id").is_none(), "a notification: {recall}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!newcomer.is_finished(), "the newcomer did not wait for the holder");
    call_noting(&mut a, "fs.delegate_return", json!({}), &mut notes).await;
    let (_b, listing) = newcomer.await.unwrap();
    let names: Vec<&str> = listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["g"]);
    let d = call_noting(&mut a, "fs.delegate", json!({"inos": 10}), &mut notes).await;
    assert_eq!(d["granted"], false, "two mounts: no delegation");
    fx.finish().await;
}
