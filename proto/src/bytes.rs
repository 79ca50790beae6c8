//! Byte-carrying wire types: [`Bytes`], [`Name`] and [`Hash`].
//!
//! In BSON frames bytes travel as BSON binary (no base64 on the hot path).
//! In JSON frames [`Bytes`] is a base64 string and a non-UTF-8 [`Name`] is an
//! array of byte values (a UTF-8 name stays a plain string). Decoders accept
//! every one of these forms.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;

/// Opaque bytes: block payloads, xattr values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

/// A file name or symlink target: any bytes (validity is checked by the server).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(pub Vec<u8>);

/// SHA-256 of a block's content; its address. Hex in both encodings.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Hash {
    /// The address of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Hash(out))
    }
}

impl Name {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(s.as_bytes().to_vec())
    }
}

impl From<&[u8]> for Name {
    fn from(s: &[u8]) -> Name {
        Name(s.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&B64.encode(&self.0)) } else { s.serialize_bytes(&self.0) }
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(&self.0),
        }
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Accepts a string (decoded by `from_str`), binary, or an array of bytes.
struct ByteVisitor {
    what: &'static str,
    from_str: fn(&str) -> Option<Vec<u8>>,
}

impl<'de> Visitor<'de> for ByteVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        (self.from_str)(v).ok_or_else(|| E::custom(format!("invalid {}", self.what)))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = ByteVisitor { what: "bytes (binary or base64 string)", from_str: |s| B64.decode(s).ok() };
        d.deserialize_any(v).map(Bytes)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = ByteVisitor { what: "a name (string, binary or byte array)", from_str: |s| Some(s.as_bytes().to_vec()) };
        d.deserialize_any(v).map(Name)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = ByteVisitor { what: "a SHA-256 hash (64 hex digits)", from_str: |s| Hash::from_hex(s).map(|h| h.0.to_vec()) };
        let bytes = d.deserialize_any(v)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| de::Error::custom("a hash has 32 bytes"))?;
        Ok(Hash(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Sample {
        data: Bytes,
        name: Name,
        odd: Name,
        hash: Hash,
    }

    fn sample() -> Sample {
        Sample { data: Bytes(vec![0, 1, 2, 255]), name: Name::from("hello"), odd: Name(vec![0xff, b'a', 0x80]), hash: Hash::of(b"abc") }
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"AAEC/w==\""), "{text}");
        assert!(text.contains("\"hello\""));
        assert_eq!(serde_json::from_str::<Sample>(&text).unwrap(), s);
    }

    #[test]
    fn bson_round_trip_uses_binary() {
        let s = sample();
        let bytes = bson::serialize_to_vec(&s).unwrap();
        let doc = bson::RawDocument::from_bytes(&bytes).unwrap();
        assert!(matches!(doc.get("data").unwrap(), Some(bson::RawBsonRef::Binary(_))));
        assert_eq!(bson::deserialize_from_slice::<Sample>(&bytes).unwrap(), s);
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(Hash::of(b"abc").to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
