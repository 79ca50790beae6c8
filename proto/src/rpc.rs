//! JSON-RPC 2.0 envelopes and frame codec.
//!
//! A WebSocket text frame carries JSON; a binary frame carries BSON documents
//! of the same shape. A JSON batch is an array; a BSON batch is a document
//! whose keys are `"0"`, `"1"`, … (the BSON layout of an array).
//!
//! Decoding is two-step so payloads are parsed once, into their final type:
//! [`split_frame`] cuts a frame into messages and reads each [`Head`]
//! (id, method); the dispatcher then decodes the typed params of that method
//! with [`RawMessage::params`].

use crate::errno::Errno;
use serde::de::{self, DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

pub const JSONRPC_VERSION: &str = "2.0";

/// Error codes (JSON-RPC reserved range, plus one for filesystem errors).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// A filesystem error; `data.errno` names it.
    pub const FS_ERROR: i64 = -32000;
    /// The frame exceeded the size limit; the connection is closed after it.
    pub const FRAME_TOO_LARGE: i64 = -32001;
}

/// A request id: JSON-RPC allows numbers, strings and null.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Num(i64),
    Str(String),
}

/// The `error` member of a response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ErrorData>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorData {
    pub errno: Errno,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }

    /// A filesystem error carrying `errno`.
    pub fn errno(errno: Errno, message: impl Into<String>) -> RpcError {
        RpcError { code: code::FS_ERROR, message: message.into(), data: Some(ErrorData { errno }) }
    }

    pub fn invalid_params(message: impl fmt::Display) -> RpcError {
        RpcError {
            code: code::INVALID_PARAMS,
            message: format!("invalid params: {message}"),
            data: Some(ErrorData { errno: Errno::EINVAL }),
        }
    }

    /// The errno this error stands for at a mount: its own, or EIO.
    pub fn as_errno(&self) -> Errno {
        match &self.data {
            Some(d) => d.errno,
            None if self.code == code::METHOD_NOT_FOUND => Errno::ENOSYS,
            None => Errno::EIO,
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.data {
            Some(d) => write!(f, "{} [{}]", self.message, d.errno),
            None => write!(f, "{} (code {})", self.message, self.code),
        }
    }
}

impl std::error::Error for RpcError {}

impl From<Errno> for RpcError {
    fn from(e: Errno) -> RpcError {
        RpcError::errno(e, e.to_string())
    }
}

/// The encoding of a frame.
pub use crate::methods::Encoding;

/// The `id` member as found: missing (a notification), null, valid or invalid.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IdField {
    #[default]
    Missing,
    Null,
    Valid(Id),
    Invalid,
}

impl IdField {
    /// The id to echo in a response (`None` is null).
    pub fn echo(&self) -> Option<Id> {
        match self {
            IdField::Valid(id) => Some(id.clone()),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for IdField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = IdField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id")
            }
            fn visit_unit<E>(self) -> Result<IdField, E> {
                Ok(IdField::Null)
            }
            fn visit_none<E>(self) -> Result<IdField, E> {
                Ok(IdField::Null)
            }
            fn visit_i64<E>(self, v: i64) -> Result<IdField, E> {
                Ok(IdField::Valid(Id::Num(v)))
            }
            fn visit_i32<E>(self, v: i32) -> Result<IdField, E> {
                Ok(IdField::Valid(Id::Num(v.into())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<IdField, E> {
                Ok(i64::try_from(v).map(|v| IdField::Valid(Id::Num(v))).unwrap_or(IdField::Invalid))
            }
            fn visit_str<E>(self, v: &str) -> Result<IdField, E> {
                Ok(IdField::Valid(Id::Str(v.to_owned())))
            }
            fn visit_f64<E>(self, _: f64) -> Result<IdField, E> {
                Ok(IdField::Invalid)
            }
            fn visit_bool<E>(self, _: bool) -> Result<IdField, E> {
                Ok(IdField::Invalid)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<IdField, E> {
                Ok(IdField::Invalid)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<IdField, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IdField::Invalid)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<IdField, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IdField::Invalid)
            }
        }
        d.deserialize_any(V)
    }
}

/// The envelope of any incoming message, params and payload left unparsed.
#[derive(Debug, Default, Deserialize)]
pub struct Head {
    #[serde(default)]
    pub jsonrpc: Option<String>,
    #[serde(default)]
    pub id: IdField,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub result: Option<IgnoredAny>,
    #[serde(default)]
    pub error: Option<RpcError>,
}

/// One message of a frame, still in its encoding.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub encoding: Encoding,
    pub bytes: Vec<u8>,
}

/// A frame cut into messages.
#[derive(Debug)]
pub struct SplitFrame {
    pub encoding: Encoding,
    pub batch: bool,
    pub messages: Vec<RawMessage>,
}

#[derive(Deserialize)]
struct ParamsOnly<P> {
    #[serde(default = "Option::default")]
    params: Option<P>,
}

#[derive(Deserialize)]
struct ResultOnly<R> {
    #[serde(default = "Option::default")]
    result: Option<R>,
    #[serde(default)]
    error: Option<RpcError>,
}

impl RawMessage {
    /// Read the envelope.
    pub fn head(&self) -> Result<Head, RpcError> {
        let head: Head = match self.encoding {
            Encoding::Json => {
                serde_json::from_slice(&self.bytes).map_err(|e| RpcError::new(code::INVALID_REQUEST, format!("invalid request: {e}")))?
            }
            Encoding::Bson => bson::deserialize_from_slice(&self.bytes)
                .map_err(|e| RpcError::new(code::INVALID_REQUEST, format!("invalid request: {e}")))?,
        };
        Ok(head)
    }

    /// Decode `params` as `P`; absent params decode as an empty object.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, RpcError> {
        let found: Option<P> = match self.encoding {
            Encoding::Json => serde_json::from_slice::<ParamsOnly<P>>(&self.bytes).map_err(RpcError::invalid_params)?.params,
            Encoding::Bson => bson::deserialize_from_slice::<ParamsOnly<P>>(&self.bytes).map_err(RpcError::invalid_params)?.params,
        };
        match found {
            Some(p) => Ok(p),
            None => serde_json::from_str("{}").map_err(|_| RpcError::invalid_params("params missing")),
        }
    }

    /// Decode a response: its result as `R`, or its error.
    pub fn result<R: DeserializeOwned>(&self) -> Result<R, RpcError> {
        let got: ResultOnly<R> = match self.encoding {
            Encoding::Json => {
                serde_json::from_slice(&self.bytes).map_err(|e| RpcError::new(code::PARSE_ERROR, format!("bad response: {e}")))?
            }
            Encoding::Bson => {
                bson::deserialize_from_slice(&self.bytes).map_err(|e| RpcError::new(code::PARSE_ERROR, format!("bad response: {e}")))?
            }
        };
        match (got.result, got.error) {
            (_, Some(e)) => Err(e),
            (Some(r), None) => Ok(r),
            (None, None) => Err(RpcError::new(code::PARSE_ERROR, "response has neither result nor error")),
        }
    }
}

/// Cut a frame into messages. A frame that is not valid JSON/BSON is a
/// parse error; an empty batch is an invalid request.
pub fn split_frame(encoding: Encoding, frame: &[u8]) -> Result<SplitFrame, RpcError> {
    let parse = |e: &dyn fmt::Display| RpcError::new(code::PARSE_ERROR, format!("parse error: {e}"));
    let messages = match encoding {
        Encoding::Json => {
            let text = std::str::from_utf8(frame).map_err(|e| parse(&e))?;
            let first = text.trim_start().as_bytes().first().copied();
            if first == Some(b'[') {
                let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(text).map_err(|e| parse(&e))?;
                let msgs: Vec<RawMessage> = items.iter().map(|r| RawMessage { encoding, bytes: r.get().as_bytes().to_vec() }).collect();
                return batch(encoding, msgs);
            }
            let _: &serde_json::value::RawValue = serde_json::from_str(text).map_err(|e| parse(&e))?;
            vec![RawMessage { encoding, bytes: frame.to_vec() }]
        }
        Encoding::Bson => {
            let doc = bson::RawDocument::from_bytes(frame).map_err(|e| parse(&e))?;
            // Walk the whole document once so a truncated one is a parse error.
            let mut keys = Vec::new();
            let mut nested = Vec::new();
            for item in doc.iter() {
                let (key, value) = item.map_err(|e| parse(&e))?;
                keys.push(key.to_string());
                if let bson::RawBsonRef::Document(d) = value {
                    nested.push(d.as_bytes().to_vec());
                }
            }
            let is_batch = !keys.is_empty() && keys.iter().enumerate().all(|(i, k)| *k == i.to_string()) && nested.len() == keys.len();
            if is_batch {
                let msgs = nested.into_iter().map(|bytes| RawMessage { encoding, bytes }).collect();
                return batch(encoding, msgs);
            }
            vec![RawMessage { encoding, bytes: frame.to_vec() }]
        }
    };
    Ok(SplitFrame { encoding, batch: false, messages })
}

fn batch(encoding: Encoding, messages: Vec<RawMessage>) -> Result<SplitFrame, RpcError> {
    if messages.is_empty() {
        return Err(RpcError::new(code::INVALID_REQUEST, "invalid request: empty batch"));
    }
    Ok(SplitFrame { encoding, batch: true, messages })
}

#[derive(Serialize)]
struct RequestOut<'a, P> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Id>,
    method: &'a str,
    params: &'a P,
}

#[derive(Serialize)]
struct ResponseOut<'a, R> {
    jsonrpc: &'static str,
    id: Option<&'a Id>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RpcError>,
}

fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).expect("JSON encoding of wire types cannot fail"),
        // Only integers above i64::MAX fail in BSON; wire types never hold one.
        Encoding::Bson => bson::serialize_to_vec(value).expect("BSON encoding of wire types cannot fail"),
    }
}

/// Encode a request (a notification when `id` is `None`).
pub fn encode_request<P: Serialize>(encoding: Encoding, id: Option<&Id>, method: &str, params: &P) -> Vec<u8> {
    encode(encoding, &RequestOut { jsonrpc: JSONRPC_VERSION, id, method, params })
}

/// Encode a response to request `id` (`None` is null).
pub fn encode_response<R: Serialize>(encoding: Encoding, id: Option<&Id>, outcome: &Result<R, RpcError>) -> Vec<u8> {
    let (result, error) = match outcome {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    encode(encoding, &ResponseOut { jsonrpc: JSONRPC_VERSION, id, result, error })
}

/// Join encoded messages into one batch frame.
pub fn encode_batch(encoding: Encoding, messages: &[Vec<u8>]) -> Vec<u8> {
    match encoding {
        Encoding::Json => {
            let mut out = Vec::with_capacity(messages.iter().map(|m| m.len() + 1).sum::<usize>() + 2);
            out.push(b'[');
            for (i, m) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(m);
            }
            out.push(b']');
            out
        }
        Encoding::Bson => {
            // int32 length, then per message: 0x03, key cstring, document; then 0x00.
            let mut body = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                body.push(0x03);
                body.extend_from_slice(i.to_string().as_bytes());
                body.push(0);
                body.extend_from_slice(m);
            }
            let total = (4 + body.len() + 1) as i32;
            let mut out = Vec::with_capacity(total as usize);
            out.extend_from_slice(&total.to_le_bytes());
            out.extend_from_slice(&body);
            out.push(0);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::{EntryParams, Method};
    use crate::{Attr, Kind, Name, Timespec};

    fn attr() -> Attr {
        let t = Timespec { sec: 1, nsec: 2 };
        Attr { ino: 7, kind: Kind::File, mode: 0o644, uid: 0, gid: 0, nlink: 1, size: 3, atime: t, mtime: t, ctime: t, rdev: 0, version: 1 }
    }

    #[test]
    fn request_round_trip_both_encodings() {
        for enc in [Encoding::Json, Encoding::Bson] {
            let p = EntryParams { parent: 1, name: Name(vec![0xfe, b'x']) };
            let bytes = encode_request(enc, Some(&Id::Num(5)), crate::methods::Lookup::NAME, &p);
            let frame = split_frame(enc, &bytes).unwrap();
            assert!(!frame.batch);
            let head = frame.messages[0].head().unwrap();
            assert_eq!(head.id, IdField::Valid(Id::Num(5)));
            assert_eq!(head.method.as_deref(), Some("fs.lookup"));
            let back: EntryParams = frame.messages[0].params().unwrap();
            assert_eq!(back.name, p.name);
        }
    }

    #[test]
    fn batch_round_trip_both_encodings() {
        for enc in [Encoding::Json, Encoding::Bson] {
            let a = encode_response(enc, Some(&Id::Num(1)), &Ok::<_, RpcError>(attr()));
            let b = encode_response::<Attr>(enc, Some(&Id::Str("x".into())), &Err(Errno::ENOENT.into()));
            let frame = split_frame(enc, &encode_batch(enc, &[a, b])).unwrap();
            assert!(frame.batch);
            assert_eq!(frame.messages.len(), 2);
            assert_eq!(frame.messages[0].result::<Attr>().unwrap(), attr());
            assert_eq!(frame.messages[1].result::<Attr>().unwrap_err().as_errno(), Errno::ENOENT);
            assert_eq!(frame.messages[1].head().unwrap().id, IdField::Valid(Id::Str("x".into())));
        }
    }

    #[test]
    fn bad_frames() {
        assert_eq!(split_frame(Encoding::Json, b"{nope").unwrap_err().code, code::PARSE_ERROR);
        assert_eq!(split_frame(Encoding::Json, b"[]").unwrap_err().code, code::INVALID_REQUEST);
        assert_eq!(split_frame(Encoding::Bson, b"\x05\x00\x00").unwrap_err().code, code::PARSE_ERROR);
        let m = RawMessage { encoding: Encoding::Json, bytes: br#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#.to_vec() };
        assert_eq!(m.head().unwrap().id, IdField::Invalid);
        let m = RawMessage { encoding: Encoding::Json, bytes: br#"{"jsonrpc":"2.0","method":"x"}"#.to_vec() };
        assert_eq!(m.head().unwrap().id, IdField::Missing);
        let m = RawMessage {
            encoding: Encoding::Json,
            bytes: br#"{"jsonrpc":"2.0","id":1,"method":"fs.lookup","params":{"parent":"x"}}"#.to_vec(),
        };
        assert_eq!(m.params::<EntryParams>().unwrap_err().code, code::INVALID_PARAMS);
    }

    #[test]
    fn missing_params_decode_as_empty() {
        let m = RawMessage { encoding: Encoding::Json, bytes: br#"{"jsonrpc":"2.0","id":1,"method":"bucket.list"}"#.to_vec() };
        let _: crate::methods::Empty = m.params().unwrap();
    }
}
