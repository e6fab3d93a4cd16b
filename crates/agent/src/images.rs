//! The image cache: `data_dir/images/<image-id>/{disk,kernel,initrd}`,
//! downloaded from the controller, each checked against the SHA-256 the
//! controller gives.
//!
//! A part is downloaded to a temporary name, hashed as it arrives, and
//! renamed into place only when size and hash match; then `<part>.sha256`
//! records the verified hash, so a verified file is never downloaded (or
//! hashed) again. A file without that record (the agent died between rename
//! and record) is hashed once more and kept if it matches. Downloads of one
//! image are serialized; different images download in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use stratus_client::types::{DesiredImage, ImagePart};
use stratus_common::ImageId;
use tokio::io::AsyncWriteExt;

use crate::api::Api;
use crate::error::ImageError;

/// How long a download may go without receiving a byte.
const STALL: Duration = Duration::from_secs(60);

/// The files of one cached image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CachedImage {
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// One host's image cache, or a whole simulated fleet's: downloads go
/// through the `Api` of the host that needs the image (the controller serves
/// an image only to hosts with a VM of it), so hosts of one process can
/// share a cache and download each image once.
pub(crate) struct ImageCache {
    dir: PathBuf,
    /// One lock per image, so two VMs of one image download it once.
    locks: Mutex<HashMap<ImageId, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf) -> Self {
        ImageCache {
            dir,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Every part of the image, verified, downloading what is missing as
    /// the host behind `api`.
    pub async fn ensure(&self, api: &Api, image: &DesiredImage) -> Result<CachedImage, ImageError> {
        let id = ImageId(image.id.0);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(id).or_default().clone()
        };
        let _held = lock.lock().await;
        let dir = self.dir.join(id.to_string());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| ImageError::Io {
                path: dir.clone(),
                source,
            })?;
        let disk = self
            .ensure_part(
                api,
                &dir,
                id,
                ImagePart::Disk,
                &image.sha256,
                Some(image.file_size),
            )
            .await?;
        let kernel = match &image.kernel_sha256 {
            Some(sha) => Some(
                self.ensure_part(api, &dir, id, ImagePart::Kernel, sha, None)
                    .await?,
            ),
            None => None,
        };
        let initrd = match (&image.kernel_sha256, &image.initrd_sha256) {
            (Some(_), Some(sha)) => Some(
                self.ensure_part(api, &dir, id, ImagePart::Initrd, sha, None)
                    .await?,
            ),
            _ => None,
        };
        Ok(CachedImage {
            disk,
            kernel,
            initrd,
        })
    }

    async fn ensure_part(
        &self,
        api: &Api,
        dir: &Path,
        id: ImageId,
        part: ImagePart,
        expected: &str,
        size: Option<u64>,
    ) -> Result<PathBuf, ImageError> {
        let name = part.to_string();
        let path = dir.join(&name);
        let marker = dir.join(format!("{name}.sha256"));
        let expected = expected.trim().to_ascii_lowercase();
        if is_verified(&path, &marker, &expected).await? {
            return Ok(path);
        }
        let started = std::time::Instant::now();
        let tmp = dir.join(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()));
        if let Err(e) = self
            .download(api, id, part, &tmp, &path, &expected, size)
            .await
        {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        write_marker(&marker, &expected).await?;
        tracing::info!(
            image = %id,
            part = %part,
            ms = started.elapsed().as_millis() as u64,
            "image part downloaded and verified"
        );
        Ok(path)
    }

    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        api: &Api,
        id: ImageId,
        part: ImagePart,
        tmp: &Path,
        path: &Path,
        expected: &str,
        size: Option<u64>,
    ) -> Result<(), ImageError> {
        let stream = api
            .image_download(id, part)
            .await
            .map_err(|source| ImageError::Download {
                image: id,
                part,
                source,
            })?;
        let io = |source| ImageError::Io {
            path: tmp.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut len: u64 = 0;
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::time::timeout(STALL, stream.next())
                .await
                .map_err(|_| ImageError::Stalled {
                    image: id,
                    part,
                    stall: STALL,
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| ImageError::Stream {
                image: id,
                part,
                source,
            })?;
            hasher.update(&chunk);
            len += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        drop(file);
        if let Some(expected) = size {
            if expected != len {
                return Err(ImageError::Size {
                    image: id,
                    part,
                    expected,
                    actual: len,
                });
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(ImageError::Checksum {
                image: id,
                part,
                expected: expected.to_string(),
                actual,
            });
        }
        tokio::fs::rename(tmp, path)
            .await
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// Whether `path` holds the part with hash `expected`: by its record, or (no
/// record) by hashing it; a file that does not match is removed.
async fn is_verified(path: &Path, marker: &Path, expected: &str) -> Result<bool, ImageError> {
    if !tokio::fs::try_exists(path).await.unwrap_or(false) {
        return Ok(false);
    }
    if let Ok(recorded) = tokio::fs::read_to_string(marker).await {
        if recorded.trim() == expected {
            return Ok(true);
        }
    }
    let p = path.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || sha256_file(&p))
        .await
        .map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if actual == expected {
        write_marker(marker, expected).await?;
        return Ok(true);
    }
    tracing::warn!(path = %path.display(), %actual, %expected, "cached image part does not match; downloading it again");
    let _ = tokio::fs::remove_file(marker).await;
    tokio::fs::remove_file(path)
        .await
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(false)
}

async fn write_marker(marker: &Path, sha: &str) -> Result<(), ImageError> {
    let tmp = marker.with_extension("sha256.tmp");
    let io = |source| ImageError::Io {
        path: marker.to_path_buf(),
        source,
    };
    tokio::fs::write(&tmp, format!("{sha}\n"))
        .await
        .map_err(io)?;
    tokio::fs::rename(&tmp, marker).await.map_err(io)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_is_verified_by_record_or_hash_and_removed_when_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let marker = dir.path().join("disk.sha256");
        let good = hex::encode(Sha256::digest(b"image bytes"));
        assert!(!is_verified(&path, &marker, &good).await.expect("absent"));

        std::fs::write(&path, b"image bytes").expect("write");
        assert!(is_verified(&path, &marker, &good).await.expect("hashed"));
        assert_eq!(
            std::fs::read_to_string(&marker).expect("marker").trim(),
            good
        );
        // With the record, the file is not hashed again: a changed file still
        // counts as verified (the cache trusts its own record).
        std::fs::write(&path, b"changed").expect("write");
        assert!(is_verified(&path, &marker, &good).await.expect("record"));

        // Another expected hash: hashed, does not match, removed.
        let other = hex::encode(Sha256::digest(b"other"));
        assert!(!is_verified(&path, &marker, &other).await.expect("mismatch"));
        assert!(!path.exists());
        assert!(!marker.exists());
    }
}
