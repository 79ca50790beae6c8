//! The credentials file, shared by `mount.restfs -o credentials=FILE`,
//! `restfs --credentials FILE` and `restfsd --credentials FILE`. Like
//! `mount.cifs`'s, one `key=value` per line, `#` starts a comment:
//!
//! ```text
//! token=4f1c0e...            # the shared secret the server expects
//! # username=alice           # reserved for password authentication
//! # password=...
//! ```
//!
//! The file must not be readable or writable by group or others.

use std::path::Path;

/// What a credentials file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Credentials {
    /// Read `path`, refusing it when group or others may access it.
    pub fn load(path: &Path) -> Result<Credentials, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!("credentials file {shown} is accessible by group or others (mode {:o}); chmod 600 it", mode & 0o777));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("credentials file {shown}: {e}"))?;
        Credentials::parse(&text).map_err(|e| format!("credentials file {shown}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut c = Credentials::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line {}: expected key=value", n + 1))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(format!("line {}: {} has no value", n + 1, key.trim()));
            }
            let slot = match key.trim() {
                "token" => &mut c.token,
                "username" | "user" => &mut c.username,
                "password" | "pass" => &mut c.password,
                other => return Err(format!("line {}: unknown key {other:?} (expected token, username or password)", n + 1)),
            };
            *slot = Some(value.to_string());
        }
        Ok(c)
    }

    /// The token, which this protocol version requires.
    pub fn require_token(self) -> Result<String, String> {
        match self {
            Credentials { token: Some(t), username: None, password: None } => Ok(t),
            Credentials { username: Some(_), .. } | Credentials { password: Some(_), .. } => {
                Err("username/password authentication is not supported yet; use token=".into())
            }
            _ => Err("no token= line".into()),
        }
    }
}

/// Compare secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format() {
        let c = Credentials::parse("# comment\n token = abc \n\n").unwrap();
        assert_eq!(c.clone().require_token().unwrap(), "abc");
        assert!(Credentials::parse("token").unwrap_err().contains("key=value"));
        assert!(Credentials::parse("token=").unwrap_err().contains("no value"));
        assert!(Credentials::parse("domain=x").unwrap_err().contains("unknown key"));
        assert!(Credentials::parse("username=a\npassword=b").unwrap().require_token().unwrap_err().contains("not supported"));
        assert!(Credentials::parse("").unwrap().require_token().unwrap_err().contains("no token"));
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }

    #[test]
    fn refused_when_others_may_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("restfs-cred-test-{}", std::process::id()));
        std::fs::write(&path, "token=t\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Credentials::load(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Credentials::load(&path).unwrap().token.as_deref(), Some("t"));
        std::fs::remove_file(&path).unwrap();
    }
}
