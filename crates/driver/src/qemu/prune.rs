//! Deleting a restore point from the middle (or the start) of a backup
//! chain: its data is merged into the next restore point first, so every
//! restore point left reads exactly as before.
//!
//! ```text
//!  before:  P ◄── D ◄── C          D is deleted
//!  rebase:  P ◄────────── C'       C' = C plus what D held that C did not
//!                                   (qemu-img rebase, safe mode)
//!  D a full backup:       C'       C' standalone: a full backup
//! ```
//!
//! `qemu-img rebase` in safe mode writes the data first and the new
//! backing file name last, so a crash in between leaves `C` reading as
//! before (its extra clusters equal what its old backing held); the delete
//! is then simply run again. `D` is removed only after `C` no longer names
//! it.

use std::path::Path;

use tokio::process::Command;

use super::backup::{data_bytes, sha256_file};
use crate::{DriverError, PruneChild, Pruned, QemuSaid};

/// The backing file `file` names, if any.
async fn backing_of(qemu_img: &Path, file: &Path) -> Result<Option<String>, DriverError> {
    let out = Command::new(qemu_img)
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| DriverError::io("cannot run qemu-img info", qemu_img, e))?;
    if !out.status.success() {
        return Err(DriverError::qemu(
            format!("qemu-img cannot read {}", file.display()),
            QemuSaid(String::from_utf8_lossy(&out.stderr).into_owned()),
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        DriverError::qemu(format!("reading qemu-img info of {}", file.display()), e)
    })?;
    Ok(info["full-backing-filename"].as_str().map(str::to_string))
}

pub(super) async fn delete(
    qemu_img: &Path,
    file: &Path,
    child: Option<&PruneChild>,
) -> Result<Option<Pruned>, DriverError> {
    let pruned = match child {
        Some(c) => {
            let want = c.new_backing.as_ref().map(|b| b.display().to_string());
            let now = backing_of(qemu_img, &c.file).await?;
            if now != want {
                if !file.is_file() {
                    return Err(DriverError::Config(format!(
                        "cannot merge {} into {}: it is gone, and {} still builds on {}",
                        file.display(),
                        c.file.display(),
                        c.file.display(),
                        now.unwrap_or_default()
                    )));
                }
                let mut cmd = Command::new(qemu_img);
                cmd.args(["rebase", "-q", "-f", "qcow2"]);
                match &c.new_backing {
                    Some(b) => {
                        cmd.args(["-F", "qcow2", "-b"]).arg(b);
                    }
                    None => {
                        cmd.args(["-b", ""]);
                    }
                }
                let out = cmd
                    .arg(&c.file)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .map_err(|e| DriverError::io("cannot run qemu-img rebase", qemu_img, e))?;
                if !out.status.success() {
                    return Err(DriverError::qemu(
                        format!(
                            "qemu-img could not merge {} into {}",
                            file.display(),
                            c.file.display()
                        ),
                        QemuSaid(String::from_utf8_lossy(&out.stderr).into_owned()),
                    ));
                }
                let f = std::fs::File::open(&c.file)
                    .map_err(|e| DriverError::io("cannot open the merged backup", &c.file, e))?;
                f.sync_all()
                    .map_err(|e| DriverError::io("cannot flush the merged backup", &c.file, e))?;
            }
            Some(Pruned {
                data_bytes: data_bytes(qemu_img, &c.file).await?,
                file_bytes: std::fs::metadata(&c.file)
                    .map_err(|e| DriverError::io("cannot read the merged backup", &c.file, e))?
                    .len(),
                sha256: sha256_file(&c.file).await?,
            })
        }
        None => None,
    };
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DriverError::io("cannot remove the backup", file, e)),
    }
    Ok(pruned)
}
