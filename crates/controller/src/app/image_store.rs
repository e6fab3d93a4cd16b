//! The controller's image store: validated disk images kept as files named by
//! image id.
//!
//! Every file is written to `tmp/` first, hashed (SHA-256) while it is
//! written, checked with `qemu-img info`, synced, and only then renamed into
//! place, so the store never holds a partial or unvalidated image under an
//! image's name. Files left in `tmp/` by a crash are removed at start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use stratus_api_types::agent::ImagePart;
use stratus_api_types::views::ImageFormat;
use stratus_common::{Error, ImageId};
use stratus_datastore::ImageData;

const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ImageStore {
    dir: PathBuf,
    /// Largest upload accepted, in bytes.
    pub max_upload: u64,
}

/// Why the store could not be set up (at start-up).
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare the image store at {path}")]
pub struct ImageStoreError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl ImageStore {
    pub fn open(dir: &Path) -> Result<Self, ImageStoreError> {
        let err = |source| ImageStoreError {
            path: dir.to_path_buf(),
            source,
        };
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(err)?;
        }
        std::fs::create_dir_all(&tmp).map_err(err)?;
        Ok(ImageStore {
            dir: dir.to_path_buf(),
            max_upload: 1 << 40,
        })
    }

    pub fn path_of(&self, id: ImageId) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    /// The file holding one part of an image.
    pub fn part_path(&self, id: ImageId, part: ImagePart) -> PathBuf {
        match part {
            ImagePart::Disk => self.path_of(id),
            ImagePart::Kernel => self.dir.join(format!("{id}.kernel")),
            ImagePart::Initrd => self.dir.join(format!("{id}.initrd")),
        }
    }

    /// Copies a kernel or initrd for direct kernel boot into the store.
    /// These are opaque files (no qemu-img check); returns their SHA-256.
    pub async fn import_boot_file(
        &self,
        id: ImageId,
        part: ImagePart,
        src: &Path,
        field: &str,
    ) -> Result<String, Error> {
        let (tmp, _, sha) = self.copy_to_tmp(id, src, field, false).await?;
        let dest = self.part_path(id, part);
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::internal(format!("moving {} into place: {e}", dest.display()))
        })?;
        Ok(sha)
    }

    /// Copies a file on the controller host (named by the request's `field`)
    /// into `tmp/`, hashing it on the way: (temp path, size, SHA-256). An
    /// empty file is refused unless `allow_empty`.
    async fn copy_to_tmp(
        &self,
        id: ImageId,
        src: &Path,
        field: &str,
        allow_empty: bool,
    ) -> Result<(PathBuf, u64, String), Error> {
        if !src.is_absolute() {
            return Err(Error::invalid(
                field,
                format!("{} is not an absolute path", src.display()),
            ));
        }
        let meta = tokio::fs::metadata(src).await.map_err(|e| {
            Error::unprocessable(
                "image_source_unreadable",
                format!("cannot read {}: {e}", src.display()),
            )
        })?;
        if !meta.is_file() || (!allow_empty && meta.len() == 0) {
            let what = if allow_empty {
                "a regular file"
            } else {
                "a non-empty regular file"
            };
            return Err(Error::unprocessable(
                "image_source_unreadable",
                format!("{} is not {what}", src.display()),
            ));
        }
        let tmp = self.tmp_path(id);
        let (s, t) = (src.to_path_buf(), tmp.clone());
        let copied = tokio::task::spawn_blocking(move || copy_hashing(&s, &t))
            .await
            .map_err(|e| Error::internal(format!("image copy task: {e}")))?;
        match copied {
            Ok((size, sha)) => Ok((tmp, size, sha)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(Error::unprocessable(
                    "image_source_unreadable",
                    format!("cannot copy {}: {e}", src.display()),
                ))
            }
        }
    }

    fn tmp_path(&self, id: ImageId) -> PathBuf {
        self.dir
            .join("tmp")
            .join(format!("{id}.{}", uuid::Uuid::new_v4().simple()))
    }

    /// Copies a file on the controller host into the store.
    pub async fn import_path(
        &self,
        id: ImageId,
        src: &Path,
        expect: Option<ImageFormat>,
    ) -> Result<ImageData, Error> {
        let (tmp, file_size, sha256) = self.copy_to_tmp(id, src, "path", true).await?;
        self.finish(id, &tmp, expect, file_size, sha256).await
    }

    /// Streams an upload into the store.
    pub async fn import_stream<S, E>(
        &self,
        id: ImageId,
        mut body: S,
        expect: Option<ImageFormat>,
    ) -> Result<ImageData, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self.tmp_path(id);
        let result: Result<(u64, String), Error> = async {
            let mut file = std::fs::File::create(&tmp)
                .map_err(|e| Error::internal(format!("creating {}: {e}", tmp.display())))?;
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| Error::bad_request(format!("upload interrupted: {e}")))?;
                size += chunk.len() as u64;
                if size > self.max_upload {
                    return Err(Error::invalid(
                        "body",
                        format!("upload exceeds the limit of {} bytes", self.max_upload),
                    ));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .map_err(|e| Error::internal(format!("writing {}: {e}", tmp.display())))?;
            }
            file.sync_all()
                .map_err(|e| Error::internal(format!("syncing {}: {e}", tmp.display())))?;
            if size == 0 {
                return Err(Error::invalid("body", "the upload is empty"));
            }
            Ok((size, hex::encode(hasher.finalize())))
        }
        .await;
        match result {
            Ok((size, sha)) => self.finish(id, &tmp, expect, size, sha).await,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Validates a written temp file and moves it into place.
    async fn finish(
        &self,
        id: ImageId,
        tmp: &Path,
        expect: Option<ImageFormat>,
        file_size: u64,
        sha256: String,
    ) -> Result<ImageData, Error> {
        let checked = inspect(tmp).await.and_then(|(format, virtual_size)| {
            if let Some(want) = expect.filter(|w| *w != format) {
                return Err(Error::unprocessable(
                    "image_format_mismatch",
                    format!(
                        "the file is {}, not {} as requested",
                        format.as_str(),
                        want.as_str()
                    ),
                ));
            }
            Ok((format, virtual_size))
        });
        let (format, virtual_size) = match checked {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(e);
            }
        };
        let dest = self.path_of(id);
        if let Err(e) = std::fs::rename(tmp, &dest) {
            let _ = std::fs::remove_file(tmp);
            return Err(Error::internal(format!(
                "moving image into {}: {e}",
                dest.display()
            )));
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(ImageData {
            format,
            virtual_size,
            file_size,
            sha256,
        })
    }

    /// Removes an image's file; absent files are fine (the delete is what
    /// matters, and a crash may have come between the row and the file).
    pub fn remove(&self, id: ImageId) {
        for part in [ImagePart::Disk, ImagePart::Kernel, ImagePart::Initrd] {
            let p = self.part_path(id, part);
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove image file");
                }
            }
        }
    }
}

fn copy_hashing(src: &Path, dest: &Path) -> std::io::Result<(u64, String)> {
    let mut input = std::fs::File::open(src)?;
    let mut out = std::fs::File::create(dest)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = std::io::Read::read(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    out.sync_all()?;
    Ok((size, hex::encode(hasher.finalize())))
}

#[derive(serde::Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// Asks `qemu-img info` what the file is. Only standalone qcow2 and raw
/// images are accepted: a backing file would let an image read files on the
/// host that runs it.
pub async fn inspect(path: &Path) -> Result<(ImageFormat, u64), Error> {
    let child = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Unavailable {
            message: format!(
                "cannot run qemu-img to validate the image ({e}); is qemu-utils installed?"
            ),
        })?;
    let out = tokio::time::timeout(QEMU_IMG_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            Error::unprocessable("invalid_image", "qemu-img took too long to read the image")
        })?
        .map_err(|e| Error::internal(format!("waiting for qemu-img: {e}")))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Error::unprocessable(
            "invalid_image",
            format!("qemu-img cannot read the file: {}", why.trim()),
        ));
    }
    let info: QemuImgInfo = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::internal(format!("parsing qemu-img output: {e}")))?;
    if let Some(b) = info.backing_filename {
        return Err(Error::unprocessable(
            "invalid_image",
            format!(
                "the image has a backing file ({b}); upload a standalone image (qemu-img convert)"
            ),
        ));
    }
    let format = match info.format.as_str() {
        "qcow2" => ImageFormat::Qcow2,
        "raw" => ImageFormat::Raw,
        other => {
            return Err(Error::unprocessable(
                "invalid_image",
                format!("images must be qcow2 or raw; this file is {other}"),
            ))
        }
    };
    Ok((format, info.virtual_size))
}
