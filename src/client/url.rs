//! Mount sources: `ws://HOST:PORT/BUCKET` (server address plus bucket).

use std::fmt;

/// A parsed `ws://HOST[:PORT][/BUCKET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `HOST:PORT`.
    pub authority: String,
    /// The bucket, when the URL names one.
    pub bucket: Option<String>,
}

impl ServerUrl {
    pub fn parse(text: &str) -> Result<ServerUrl, String> {
        let rest = text
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{text:?} is not a RestFS URL: expected ws://HOST:PORT/BUCKET (wss:// is not supported yet)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:{}", restfs_proto::DEFAULT_PORT)
        };
        let bucket = path.trim_end_matches('/');
        if bucket.contains('/') {
            return Err(format!("{text:?}: the path must be a single bucket name"));
        }
        Ok(ServerUrl { authority, bucket: (!bucket.is_empty()).then(|| bucket.to_string()) })
    }

    /// The WebSocket endpoint (the bucket is chosen inside the protocol).
    pub fn endpoint(&self) -> String {
        format!("ws://{}/", self.authority)
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}/{}", self.authority, self.bucket.as_deref().unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let u = ServerUrl::parse("ws://10.0.0.1:9000/home").unwrap();
        assert_eq!((u.authority.as_str(), u.bucket.as_deref()), ("10.0.0.1:9000", Some("home")));
        assert_eq!(u.endpoint(), "ws://10.0.0.1:9000/");
        let u = ServerUrl::parse("ws://server/b/").unwrap();
        assert_eq!((u.authority.as_str(), u.bucket.as_deref()), ("server:7878", Some("b")));
        assert_eq!(ServerUrl::parse("ws://h:1").unwrap().bucket, None);
        assert!(ServerUrl::parse("http://h/b").is_err());
        assert!(ServerUrl::parse("ws://h/a/b").is_err());
        assert!(ServerUrl::parse("ws:///b").is_err());
    }
}
