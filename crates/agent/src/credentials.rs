//! The host's credential, kept in `data_dir/agent.json` (mode 0600, created
//! that way): written once at enrollment, read at every later start so the
//! one-time enrollment token is needed only once.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stratus_common::HostId;

use crate::error::AgentError;

const FILE: &str = "agent.json";

/// What an enrolled agent keeps.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The controller the host enrolled with, as it was given: one URL,
    /// or several separated by commas. A start without `--url` uses it.
    pub url: String,
    pub host_id: HostId,
    /// The host's secret (`stratus-host_...`), sent as a bearer token.
    pub credential: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("url", &self.url)
            .field("host_id", &self.host_id)
            .field("credential", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Where the credential lives in a data dir.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// The credential in `data_dir`, or `None` when the host has not
    /// enrolled from this data dir yet.
    pub fn load(data_dir: &Path) -> Result<Option<Credentials>, AgentError> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AgentError::CredentialRead { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| AgentError::CredentialParse { path, source })
    }

    /// Writes the credential so that only its owner can ever read it: a new
    /// file created with mode 0600, then renamed into place.
    pub fn save(&self, data_dir: &Path) -> Result<(), AgentError> {
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            AgentError::CredentialWrite {
                path: path.clone(),
                source,
            }
        })
    }
}

/// The machine's host name made into a valid Stratus name (a DNS label):
/// the first label, lowercased, other characters turned into `-`.
pub fn default_host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    sanitize_name(&raw)
}

fn sanitize_name(raw: &str) -> String {
    let label = raw.trim().split('.').next().unwrap_or_default();
    let mut s: String = label
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s = format!("host-{s}");
    }
    s.truncate(63);
    while s.ends_with('-') {
        s.pop();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn host_names_become_valid_names() {
        assert_eq!(sanitize_name("vm\n"), "vm");
        assert_eq!(sanitize_name("Web_01.example.com"), "web-01");
        assert_eq!(sanitize_name("1box"), "host-1box");
        assert_eq!(sanitize_name(""), "host");
        assert_eq!(sanitize_name("a-"), "a");
        assert_eq!(sanitize_name(&"x".repeat(80)).len(), 63);
        assert!(default_host_name()
            .parse::<stratus_client::types::Name>()
            .is_ok());
    }

    #[test]
    fn credentials_are_private_and_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Credentials::load(dir.path()).expect("load"), None);
        let c = Credentials {
            url: "http://127.0.0.1:8480".into(),
            host_id: HostId::new(),
            credential: "stratus-host_secret".into(),
        };
        c.save(dir.path()).expect("save");
        let mode = std::fs::metadata(Credentials::path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            Credentials::load(dir.path()).expect("load"),
            Some(c.clone())
        );
        assert!(!format!("{c:?}").contains("secret"));
        std::fs::write(Credentials::path(dir.path()), "{").expect("write");
        assert!(matches!(
            Credentials::load(dir.path()),
            Err(AgentError::CredentialParse { .. })
        ));
    }
}
