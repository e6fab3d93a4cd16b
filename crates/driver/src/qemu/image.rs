//! Disk images through `qemu-img`: the base image's virtual size and the VM's
//! copy-on-write overlay. Both take constant time whatever the image size.

use std::path::Path;
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

/// The guest-visible size of an image. `-U` (force share): the base image may
/// be open in running VMs as a read-only backing file.
pub(crate) async fn virtual_size(
    qemu_img: &Path,
    image: &Path,
    format: ImageFormat,
) -> Result<u64, DriverError> {
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
