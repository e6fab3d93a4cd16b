//! Where the CLI connects, and with which token.
//!
//! Precedence: `--url`/`--token` flags, then `STRATUS_URL`/`STRATUS_TOKEN`,
//! then the config file (`--config`, `STRATUS_CONFIG`, or
//! `$XDG_CONFIG_HOME/stratus/config.toml`), which `stratus up` writes:
//!
//! ```toml
//! url = "http://127.0.0.1:8480"
//! token_file = "/home/me/.local/share/stratus/admin.token"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "http://127.0.0.1:8480";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConfigFile {
    pub url: Option<String>,
    /// The token itself (prefer `token_file`).
    pub token: Option<String>,
    /// A file holding the token (mode 0600).
    pub token_file: Option<PathBuf>,
}

/// The default config file path.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("stratus").join("config.toml"))
}

impl ConfigFile {
    /// Reads a config file; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s)
                .map_err(|e| anyhow::anyhow!("config file {} is invalid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read config file {}: {e}",
                path.display()
            )),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string(self)?;
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    /// The token: inline, or read from `token_file`.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim().to_string()))
                .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", p.display())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_token_files() {
        let dir = tempfile::tempdir().expect("dir");
        let token = dir.path().join("t");
        std::fs::write(&token, "stratus_abc\n").expect("write");
        let cfg = ConfigFile {
            url: Some("http://x:1".into()),
            token: None,
            token_file: Some(token),
        };
        let path = dir.path().join("c/config.toml");
        cfg.save(&path).expect("save");
        let back = ConfigFile::load(&path).expect("load");
        assert_eq!(back.url.as_deref(), Some("http://x:1"));
        assert_eq!(back.token().expect("token").as_deref(), Some("stratus_abc"));
        assert!(ConfigFile::load(&dir.path().join("missing"))
            .expect("missing is empty")
            .url
            .is_none());
        std::fs::write(&path, "url = [").expect("write");
        assert!(ConfigFile::load(&path).is_err());
    }
}
