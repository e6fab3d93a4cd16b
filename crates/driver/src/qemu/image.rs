//! Disk images through `qemu-img`: the base image's virtual size and the VM's
//! copy-on-write overlay. Both take constant time whatever the image size.
//!
//! What a qcow2 file's header says (its size, its backing file) is read
//! straight from the header ([`read_qcow2_header`]) rather than through
//! `qemu-img info`: each `qemu-img` run costs 12–30 ms on our hosts, and a
//! migration's destination asked twice on its critical path. Anything the
//! reader does not understand falls back to `qemu-img`.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::process::Command;

use crate::{DriverError, ImageFormat, QemuSaid};

#[derive(Deserialize)]
struct ImageInfo {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

pub(super) async fn run_qemu_img(
    qemu_img: &Path,
    args: &[&std::ffi::OsStr],
    context: &str,
) -> Result<Vec<u8>, DriverError> {
    let out = Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| DriverError::io(format!("cannot run qemu-img to {context}"), qemu_img, e))?;
    if !out.status.success() {
        return Err(DriverError::qemu(
            format!("qemu-img failed to {context}"),
            QemuSaid(String::from_utf8_lossy(&out.stderr).into_owned()),
        ));
    }
    Ok(out.stdout)
}

/// The guest-visible size of an image: a raw image's length, a qcow2's
/// header field, or (a header this module cannot read) `qemu-img info -U`
/// (force share: the base image may be open in running VMs as a read-only
/// backing file).
pub(crate) async fn virtual_size(
    qemu_img: &Path,
    image: &Path,
    format: ImageFormat,
) -> Result<u64, DriverError> {
    let quick = match format {
        ImageFormat::Raw => std::fs::metadata(image).map(|m| m.len()).ok(),
        ImageFormat::Qcow2 => read_qcow2_header(image).ok().map(|h| h.virtual_size),
    };
    if let Some(size) = quick {
        return Ok(size);
    }
    let context = format!("read the size of image {}", image.display());
    let out = run_qemu_img(
        qemu_img,
        &[
            "info".as_ref(),
            "-U".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.as_qemu_str().as_ref(),
            image.as_os_str(),
        ],
        &context,
    )
    .await?;
    let info: ImageInfo = serde_json::from_slice(&out)
        .map_err(|e| DriverError::qemu(format!("cannot {context}"), e))?;
    Ok(info.virtual_size)
}

/// Creates a qcow2 overlay at `overlay` backed by `image` (absolute path,
/// format recorded in the overlay), `size` bytes large if given.
pub(crate) async fn create_overlay(
    qemu_img: &Path,
    image: &Path,
    format: ImageFormat,
    overlay: &Path,
    size: Option<u64>,
) -> Result<(), DriverError> {
    let size = size.map(|s| s.to_string());
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        format.as_qemu_str().as_ref(),
        "-b".as_ref(),
        image.as_os_str(),
        overlay.as_os_str(),
    ];
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    run_qemu_img(
        qemu_img,
        &args,
        &format!("create the disk overlay {}", overlay.display()),
    )
    .await?;
    Ok(())
}

/// The parts of a qcow2 header the driver needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Qcow2Header {
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// The backing file, resolved as QEMU resolves it (a relative name is
    /// relative to the directory of the file naming it), and its format if
    /// the header records one.
    pub backing: Option<(PathBuf, Option<String>)>,
}

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: end of the list.
const EXT_END: u32 = 0;
/// Bound on what is read for extensions and names (a header is one cluster
/// at most, and QEMU's names are at most 1023 bytes).
const MAX_HEADER_BYTES: u64 = 64 * 1024;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn be_u32(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| invalid("qcow2 header truncated"))
}

fn be_u64(b: &[u8], at: usize) -> io::Result<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| invalid("qcow2 header truncated"))
}

/// Reads a qcow2 file's header (layout: QEMU's `docs/interop/qcow2.txt`):
/// version 2 or 3, the size, the backing file name and the backing format
/// extension. Fails on anything else, including a backing name that is not
/// a plain path (a `json:` or protocol name): callers then ask `qemu-img`.
pub(crate) fn read_qcow2_header(path: &Path) -> io::Result<Qcow2Header> {
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 104];
    let n = f.read(&mut head)?;
    head.truncate(n);
    if be_u32(&head, 0)? != QCOW2_MAGIC {
        return Err(invalid("not a qcow2 file"));
    }
    let version = be_u32(&head, 4)?;
    let header_length = match version {
        2 => 72,
        3 => u64::from(be_u32(&head, 100)?),
        v => return Err(invalid(format!("qcow2 version {v}"))),
    };
    let backing_offset = be_u64(&head, 8)?;
    let backing_len = u64::from(be_u32(&head, 16)?);
    let virtual_size = be_u64(&head, 24)?;
    let mut read_at = |offset: u64, len: u64| -> io::Result<Vec<u8>> {
        if len > MAX_HEADER_BYTES || offset > MAX_HEADER_BYTES {
            return Err(invalid("qcow2 header field out of bounds"));
        }
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
        Ok(buf)
    };
    if backing_offset == 0 {
        return Ok(Qcow2Header {
            virtual_size,
            backing: None,
        });
    }
    let name = String::from_utf8(read_at(backing_offset, backing_len)?)
        .map_err(|_| invalid("backing file name is not UTF-8"))?;
    if name.is_empty()
        || name.starts_with("json:")
        || (name.contains(':') && !name.starts_with('/'))
    {
        return Err(invalid(format!(
            "backing file name {name:?} is not a plain path"
        )));
    }
    // The extensions sit between the header and the end of the first
    // cluster; the backing name follows them.
    let ext_len = backing_offset.saturating_sub(header_length);
    let exts = read_at(header_length, ext_len)?;
    let mut format = None;
    let mut at = 0usize;
    while at + 8 <= exts.len() {
        let kind = be_u32(&exts, at)?;
        let len = be_u32(&exts, at + 4)? as usize;
        if kind == EXT_END {
            break;
        }
        let data = exts
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| invalid("qcow2 header extension truncated"))?;
        if kind == EXT_BACKING_FORMAT {
            format = Some(
                String::from_utf8(data.to_vec())
                    .map_err(|_| invalid("backing format is not UTF-8"))?,
            );
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    let backing = PathBuf::from(&name);
    let backing = if backing.is_absolute() {
        backing
    } else {
        path.parent().unwrap_or(Path::new(".")).join(backing)
    };
    Ok(Qcow2Header {
        virtual_size,
        backing: Some((backing, format)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img() -> Option<PathBuf> {
        let p = PathBuf::from("/usr/bin/qemu-img");
        p.exists().then_some(p)
    }

    async fn create(args: &[&str]) {
        let img = qemu_img().expect("qemu-img");
        let os: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        run_qemu_img(&img, &os, "create a test image")
            .await
            .expect("qemu-img create");
    }

    /// The header reader agrees with `qemu-img info` on what qemu-img made:
    /// sizes, absolute and relative backing names, qcow2 versions 2 and 3.
    #[tokio::test]
    async fn header_reader_agrees_with_qemu_img() {
        let Some(img) = qemu_img() else {
            eprintln!("SKIP: no qemu-img");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        create(&["create", "-q", "-f", "qcow2", &d("base.qcow2"), "10M"]).await;
        create(&["create", "-q", "-f", "raw", &d("base.raw"), "3M"]).await;
        // An overlay: `-F FORMAT -b BACKING FILE [SIZE]`, with extra options.
        let overlay = |opts: &[&str], format: &str, backing: &str, file: &str, size: &str| {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            a.extend_from_slice(opts);
            a.extend_from_slice(&["-F", format, "-b", backing, file]);
            if !size.is_empty() {
                a.push(size);
            }
            a.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        for args in [
            overlay(&[], "qcow2", &d("base.qcow2"), &d("abs.qcow2"), "20M"),
            overlay(
                &["-o", "compat=0.10"],
                "raw",
                &d("base.raw"),
                &d("v2.qcow2"),
                "",
            ),
            overlay(&[], "qcow2", "abs.qcow2", &d("rel.qcow2"), ""),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            create(&args).await;
        }

        let base = read_qcow2_header(Path::new(&d("base.qcow2"))).expect("base");
        assert_eq!(
            base,
            Qcow2Header {
                virtual_size: 10 << 20,
                backing: None
            }
        );
        let abs = read_qcow2_header(Path::new(&d("abs.qcow2"))).expect("abs");
        assert_eq!(abs.virtual_size, 20 << 20);
        assert_eq!(
            abs.backing,
            Some((PathBuf::from(d("base.qcow2")), Some("qcow2".into())))
        );
        let v2 = read_qcow2_header(Path::new(&d("v2.qcow2"))).expect("v2");
        assert_eq!(v2.virtual_size, 3 << 20);
        assert_eq!(
            v2.backing,
            Some((PathBuf::from(d("base.raw")), Some("raw".into())))
        );
        let rel = read_qcow2_header(Path::new(&d("rel.qcow2"))).expect("rel");
        assert_eq!(
            rel.backing,
            Some((dir.path().join("abs.qcow2"), Some("qcow2".into())))
        );

        for (file, format) in [
            ("base.qcow2", ImageFormat::Qcow2),
            ("abs.qcow2", ImageFormat::Qcow2),
            ("base.raw", ImageFormat::Raw),
        ] {
            let quick = virtual_size(&img, Path::new(&d(file)), format)
                .await
                .expect("size");
            let out = run_qemu_img(
                &img,
                &[
                    "info".as_ref(),
                    "--output=json".as_ref(),
                    "-U".as_ref(),
                    "-f".as_ref(),
                    format.as_qemu_str().as_ref(),
                    d(file).as_ref(),
                ],
                "info",
            )
            .await
            .expect("info");
            let info: ImageInfo = serde_json::from_slice(&out).expect("json");
            assert_eq!(quick, info.virtual_size, "{file}");
        }
        // Not qcow2: an error, so callers fall back to qemu-img.
        assert!(read_qcow2_header(Path::new(&d("base.raw"))).is_err());
        std::fs::write(d("short"), b"QFI").expect("write");
        assert!(read_qcow2_header(Path::new(&d("short"))).is_err());
    }
}
