//! [`BlockStore`] in an S3-compatible object store (AWS S3, MinIO, Ceph
//! RGW, Garage, …), so that the blocks of every restfsd can live in one
//! place that scales on its own.
//!
//! A block is the object `<prefix><hex hash>`. A put is a single PUT: S3
//! makes an object visible only whole and only once stored durably, so a
//! commit naming a block never outlives it. Requests are signed with AWS
//! Signature V4 (rusty-s3, presigned for a few minutes) and sent with a
//! blocking HTTP client: the service calls block stores from blocking
//! threads. A failed connection, a 5xx or a 429 is retried with backoff
//! for up to [`RETRY_FOR`]; what S3 refuses outright (403, a missing
//! bucket) fails at once.
//!
//! S3 has no fixed size: [`BlockStore::space`] reports [`CAPACITY`], all
//! free, without asking the store.

use super::BlockStore;
use crate::error::{Error, Result};
use base64::Engine;
use restfs_proto::{Errno, Hash};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::time::{Duration, Instant};

/// How long a presigned request stays valid.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// How long a request that fails in passing is tried again.
pub const RETRY_FOR: Duration = Duration::from_secs(30);

/// The same, for the check at start: a wrong endpoint is reported soon.
const RETRY_AT_START: Duration = Duration::from_secs(3);

/// The timeout of one request, upload or download of a whole block included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The timeout of a connection's setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The header that carries a block's SHA-256 (base64) with its upload.
const CHECKSUM_HEADER: &str = "x-amz-checksum-sha256";

/// The object, under the prefix, that names the data directory whose
/// blocks the prefix holds.
pub const OWNER_OBJECT: &str = "restfsd-owner";

/// The size reported for an S3 store, which has none: 1 PiB.
pub const CAPACITY: u64 = 1 << 50;

/// Where the blocks go: the bucket, the key prefix, the endpoint, the
/// credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Prepended to every key; empty, or ending in `/`.
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    /// `bucket.host/key` (AWS) or `host/bucket/key` (most other servers).
    pub path_style: bool,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub session_token: Option<String>,
    /// PEM file of the CA certificates to trust instead of the usual roots
    /// (a server behind a private CA).
    pub ca_bundle: Option<String>,
}

impl std::fmt::Debug for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No secret in logs, whatever prints this.
        f.debug_struct("S3Location")
            .field("location", &self.to_string())
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "…"))
            .field("session_token", &self.session_token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl S3Location {
    /// Parse `s3://BUCKET[/PREFIX]`; the rest comes from the standard AWS
    /// variables, read through `env`: `AWS_ENDPOINT_URL` (default: AWS in
    /// `AWS_REGION`, itself `us-east-1` by default), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and `AWS_CA_BUNDLE`. A custom endpoint
    /// is addressed path-style (`host/bucket/key`), which MinIO, Ceph and
    /// Garage expect; AWS itself by virtual host.
    pub fn parse(url: &str, env: impl Fn(&str) -> Option<String>) -> std::result::Result<S3Location, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url:?}: a block store URL starts with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{url:?}: no bucket name (s3://BUCKET[/PREFIX])"));
        }
        let prefix = match prefix.trim_end_matches('/') {
            "" => String::new(),
            p if p.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") => {
                return Err(format!("{url:?}: the prefix may not have empty, '.' or '..' parts"));
            }
            p => format!("{p}/"),
        };
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into());
        let custom = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"));
        // Virtual-host names with dots break TLS name checks at AWS.
        let path_style = custom.is_some() || bucket.contains('.');
        let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix,
            endpoint,
            region,
            path_style,
            access_key: env("AWS_ACCESS_KEY_ID"),
            secret_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: env("AWS_SESSION_TOKEN"),
            ca_bundle: env("AWS_CA_BUNDLE"),
        })
    }

    /// `s3://BUCKET/PREFIX/`: what names the store, whatever the endpoint.
    pub fn name(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.name(), self.endpoint)
    }
}

pub struct S3Blocks {
    bucket: Bucket,
    credentials: Option<Credentials>,
    prefix: String,
    agent: ureq::Agent,
}

/// What a request came back with: a status and the body of a GET or of
/// an error.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    /// A 404 about the key, not the bucket (a HEAD's 404 has no body to tell).
    fn missing_key(&self) -> bool {
        self.status == 404 && self.error_code() != Some("NoSuchBucket")
    }

    /// The `<Code>` of an S3 error document, if there is one.
    fn error_code(&self) -> Option<&str> {
        let text = std::str::from_utf8(&self.body).ok()?;
        let (_, rest) = text.split_once("<Code>")?;
        Some(rest.split_once("</Code>")?.0)
    }
}

fn store_error(what: String) -> Error {
    Error::Io(std::io::Error::other(what))
}

impl S3Blocks {
    /// Connect to the bucket, which must exist and let these credentials
    /// write, read and delete: checked here, so that a wrong setting stops
    /// restfsd at start rather than at the first upload.
    pub fn open(at: &S3Location) -> Result<S3Blocks> {
        let endpoint = at.endpoint.parse().map_err(|e| store_error(format!("endpoint {:?}: {e}", at.endpoint)))?;
        let style = if at.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(endpoint, style, at.bucket.clone(), at.region.clone())
            .map_err(|e| store_error(format!("bucket {:?}: {e}", at.bucket)))?;
        let credentials = match (&at.access_key, &at.secret_key) {
            (Some(key), Some(secret)) => Some(match &at.session_token {
                Some(token) => Credentials::new_with_token(key.clone(), secret.clone(), token.clone()),
                None => Credentials::new(key.clone(), secret.clone()),
            }),
            (None, None) => None,
            _ => return Err(store_error("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither".into())),
        };
        if credentials.is_none() {
            tracing::warn!("no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: requests to {at} go unsigned (anonymous)");
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            // S3 redirects only to say the region is wrong: an error to show, not to follow.
            .max_redirects(0);
        if let Some(pem) = &at.ca_bundle {
            config = config.tls_config(ureq::tls::TlsConfig::builder().root_certs(ca_roots(pem)?).build());
        }
        let store = S3Blocks { bucket, credentials, prefix: at.prefix.clone(), agent: config.build().into() };
        store.check(at)?;
        Ok(store)
    }

    /// Write, read back and delete a probe object.
    fn check(&self, at: &S3Location) -> Result<()> {
        let key = format!("{}restfsd-probe-{}", self.prefix, std::process::id());
        let probe = b"restfsd: checking access to the block store";
        let hash = Hash::of(probe);
        let round_trip = || -> Result<()> {
            let request = |verb| self.request_within(verb, &key, RETRY_AT_START);
            self.expect(request(Verb::put(probe, &hash))?, &[200], "PUT", &key)?;
            if self.expect(request(Verb::Get)?, &[200], "GET", &key)?.body != probe {
                return Err(store_error("the probe object read back differs from what was written".into()));
            }
            self.expect(request(Verb::Delete)?, &[200, 204], "DELETE", &key).map(|_| ())
        };
        round_trip().map_err(|e| match e {
            Error::Io(e) => store_error(format!("{at}: {e}")),
            e => e,
        })
    }

    /// Make this prefix the data directory `owner`'s, or refuse it if
    /// another's: blocks are named by their content, so a second data
    /// directory on the prefix would have its blocks deleted by the first
    /// one's garbage collection, and the other way round.
    pub fn claim(&self, owner: &str, at: &S3Location) -> Result<()> {
        let key = format!("{}{OWNER_OBJECT}", self.prefix);
        let mut found = self.request_within(Verb::Get, &key, RETRY_AT_START)?;
        if found.missing_key() {
            // Only if still absent: of two first starts at once, one wins.
            let hash = Hash::of(owner.as_bytes());
            let put = Verb::Put { data: owner.as_bytes(), hash: &hash, if_absent: true };
            let put = self.request_within(put, &key, RETRY_AT_START)?;
            if put.status != 412 {
                return self.expect(put, &[200], "PUT", &key).map(|_| ());
            }
            found = self.request_within(Verb::Get, &key, RETRY_AT_START)?;
        }
        let found = self.expect(found, &[200], "GET", &key)?;
        let named = String::from_utf8_lossy(&found.body);
        if named.trim() == owner {
            return Ok(());
        }
        Err(store_error(format!(
            "{at} holds the blocks of another restfsd data directory (its {key} names {}, this one is {owner}): give each data directory a bucket or prefix of its own",
            named.trim()
        )))
    }

    fn key(&self, hash: &Hash) -> String {
        format!("{}{}", self.prefix, hash.to_hex())
    }

    /// Send one request, again while it fails in passing.
    fn request(&self, verb: Verb<'_>, key: &str) -> Result<Answer> {
        self.request_within(verb, key, RETRY_FOR)
    }

    fn request_within(&self, verb: Verb<'_>, key: &str, patience: Duration) -> Result<Answer> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let tried = self.send_once(verb, key);
            let passing = match &tried {
                Ok(a) => a.status >= 500 || a.status == 429 || a.error_code() == Some("RequestTimeout"),
                Err(_) => true,
            };
            if !passing || started.elapsed() + pause > patience {
                return match tried {
                    Ok(a) => Ok(a),
                    Err(e) => Err(store_error(format!("{} {key}: {e}", verb.name()))),
                };
            }
            tracing::warn!("block store: {} {key} failed ({}), trying again", verb.name(), describe(&tried));
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn send_once(&self, verb: Verb<'_>, key: &str) -> std::result::Result<Answer, ureq::Error> {
        let creds = self.credentials.as_ref();
        let mut response = match verb {
            Verb::Put { data, hash, if_absent } => {
                // The store checks the bytes against their hash (signed): a
                // block damaged on the way is refused (BadDigest).
                let sum = base64::engine::general_purpose::STANDARD.encode(hash.0);
                let mut put = self.bucket.put_object(creds, key);
                put.headers_mut().insert(CHECKSUM_HEADER, sum.clone());
                let request = self.agent.put(put.sign(SIGNED_FOR).as_str()).header(CHECKSUM_HEADER, &sum);
                if if_absent { request.header("If-None-Match", "*").send(data)? } else { request.send(data)? }
            }
            Verb::Get => self.agent.get(self.bucket.get_object(creds, key).sign(SIGNED_FOR).as_str()).call()?,
            Verb::Head => self.agent.head(self.bucket.head_object(creds, key).sign(SIGNED_FOR).as_str()).call()?,
            Verb::Delete => self.agent.delete(self.bucket.delete_object(creds, key).sign(SIGNED_FOR).as_str()).call()?,
        };
        let status = response.status().as_u16();
        let wanted = match verb {
            Verb::Get if status == 200 => u64::MAX,
            Verb::Head => 0,
            _ if status >= 300 => 64 << 10,
            _ => 0,
        };
        // Blocks are a few MiB at most; ureq's default limit is 10 MB.
        let body = if wanted > 0 { response.body_mut().with_config().limit(wanted).read_to_vec()? } else { Vec::new() };
        Ok(Answer { status, body })
    }

    /// `answer` if its status is one of `ok`, else the error it stands for.
    fn expect(&self, answer: Answer, ok: &[u16], verb: &str, key: &str) -> Result<Answer> {
        if ok.contains(&answer.status) {
            return Ok(answer);
        }
        let what = match (answer.status, answer.error_code()) {
            (403, code) => format!(
                "access denied ({}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may list the bucket and put, get and delete its objects)",
                code.unwrap_or("403")
            ),
            (404, Some("NoSuchBucket") | None) => format!("bucket {:?} not found", self.bucket.name()),
            (s, Some(code)) => format!("HTTP status {s}: {code}"),
            (s, None) => format!("HTTP status {s}"),
        };
        Err(store_error(format!("{verb} {key}: {what}")))
    }
}

/// The certificates of the PEM file `path`.
fn ca_roots(path: &str) -> Result<ureq::tls::RootCerts> {
    let pem = std::fs::read(path).map_err(|e| store_error(format!("AWS_CA_BUNDLE {path}: {e}")))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| store_error(format!("AWS_CA_BUNDLE {path}: {e}")))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(store_error(format!("AWS_CA_BUNDLE {path}: no certificate in it")));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

fn describe(tried: &std::result::Result<Answer, ureq::Error>) -> String {
    match tried {
        Ok(a) => format!("HTTP status {}", a.status),
        Err(e) => e.to_string(),
    }
}

#[derive(Clone, Copy)]
enum Verb<'a> {
    /// A PUT, with the bytes' SHA-256 (`hash`) for the store to check;
    /// with `if_absent`, only if the key is (412 otherwise).
    Put {
        data: &'a [u8],
        hash: &'a Hash,
        if_absent: bool,
    },
    Get,
    Head,
    Delete,
}

impl<'a> Verb<'a> {
    fn put(data: &'a [u8], hash: &'a Hash) -> Verb<'a> {
        Verb::Put { data, hash, if_absent: false }
    }

    fn name(&self) -> &'static str {
        match self {
            Verb::Put { .. } => "PUT",
            Verb::Get => "GET",
            Verb::Head => "HEAD",
            Verb::Delete => "DELETE",
        }
    }
}

impl BlockStore for S3Blocks {
    fn put(&self, hash: &Hash, data: &[u8]) -> Result<()> {
        let key = self.key(hash);
        self.expect(self.request(Verb::put(data, hash), &key)?, &[200], "PUT", &key).map(|_| ())
    }

    fn get(&self, hash: &Hash) -> Result<Vec<u8>> {
        let key = self.key(hash);
        let answer = self.request(Verb::Get, &key)?;
        if answer.missing_key() {
            return Err(Error::fs(Errno::ENOENT, format!("block {hash} missing from the block store")));
        }
        Ok(self.expect(answer, &[200], "GET", &key)?.body)
    }

    fn has(&self, hash: &Hash) -> Result<bool> {
        let key = self.key(hash);
        match self.request(Verb::Head, &key)? {
            a if a.missing_key() => Ok(false),
            a => self.expect(a, &[200], "HEAD", &key).map(|_| true),
        }
    }

    fn delete(&self, hash: &Hash) -> Result<()> {
        let key = self.key(hash);
        match self.request(Verb::Delete, &key)? {
            // Some servers answer 404 for an absent key, S3 itself 204.
            a if a.missing_key() => Ok(()),
            a => self.expect(a, &[200, 204], "DELETE", &key).map(|_| ()),
        }
    }

    fn space(&self) -> Result<(u64, u64)> {
        Ok((CAPACITY, CAPACITY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn a_location_comes_from_the_url_and_the_aws_variables() {
        let at = S3Location::parse(
            "s3://blocks/restfs/prod/",
            env(&[("AWS_REGION", "eu-west-3"), ("AWS_ACCESS_KEY_ID", "AK"), ("AWS_SECRET_ACCESS_KEY", "SK")]),
        )
        .unwrap();
        assert_eq!((at.bucket.as_str(), at.prefix.as_str()), ("blocks", "restfs/prod/"));
        assert_eq!((at.endpoint.as_str(), at.path_style), ("https://s3.eu-west-3.amazonaws.com", false));
        assert_eq!((at.access_key.as_deref(), at.secret_key.as_deref(), at.session_token), (Some("AK"), Some("SK"), None));

        let at = S3Location::parse("s3://b", env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")])).unwrap();
        assert_eq!(
            (at.prefix.as_str(), at.endpoint.as_str(), at.path_style, at.region.as_str()),
            ("", "http://127.0.0.1:9000", true, "us-east-1")
        );
        assert_eq!(at.access_key, None);
    }

    #[test]
    fn a_bad_location_is_refused() {
        for url in ["blocks", "s3://", "s3:///prefix", "file:///tmp", "s3://b/../other", "s3://b//p", "s3://b/./p"] {
            assert!(S3Location::parse(url, env(&[])).is_err(), "{url}");
        }
    }
}
