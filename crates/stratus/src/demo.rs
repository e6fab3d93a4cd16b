//! The demo `stratus up` sets up on first start, so a newcomer sees a real VM
//! running: project `demo`, flavor `tiny`, the public image `stratus-guest`
//! (the tiny test guest from `scripts/build-guest-image.sh`) and the VM
//! `demo`. Everything goes through the API with the admin token, like any
//! client; what already exists is left alone.

use std::path::{Path, PathBuf};

use anyhow::Context;
use stratus_client::types;
use stratus_client::Client;

/// Where `scripts/build-guest-image.sh` leaves the guest.
pub fn default_guest_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("STRATUS_GUEST_DIR") {
        return Some(PathBuf::from(d));
    }
    dirs::cache_dir().map(|c| c.join("stratus").join("guest"))
}

fn client(url: &str, token: &str) -> anyhow::Result<Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("token is not a header value")?,
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    Ok(Client::new_with_client(url, http))
}

fn is_conflict<E>(e: &stratus_client::Error<E>) -> bool {
    e.status().is_some_and(|s| s.as_u16() == 409)
}

/// Creates what is missing of the demo. Returns a line to print.
pub async fn seed(url: &str, token: &str, guest_dir: &Path) -> anyhow::Result<String> {
    let disk = guest_dir.join("disk.qcow2");
    let kernel = guest_dir.join("vmlinuz");
    let initrd = guest_dir.join("initrd.img");
    if !(disk.exists() && kernel.exists() && initrd.exists()) {
        return Ok(format!(
            "no demo VM: the test guest is not built in {} (run scripts/build-guest-image.sh)",
            guest_dir.display()
        ));
    }
    let c = client(url, token)?;
    let name = |s: &str| s.parse::<types::Name>().map_err(|e| anyhow::anyhow!("{e}"));
    if let Err(e) = c
        .project_create()
        .body(types::ProjectCreate {
            name: name("demo")?,
            description: Some("created by stratus up".into()),
        })
        .send()
        .await
    {
        if !is_conflict(&e) {
            return Err(anyhow::anyhow!("creating the demo project: {e}"));
        }
    }
    if let Err(e) = c
        .flavor_create()
        .body(types::FlavorCreate {
            name: name("tiny")?,
            vcpus: 1,
            memory_bytes: 128 << 20,
            disk_bytes: 1 << 30,
        })
        .send()
        .await
    {
        if !is_conflict(&e) {
            return Err(anyhow::anyhow!("creating the tiny flavor: {e}"));
        }
    }
    let manifest: serde_json::Value = std::fs::read(guest_dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let cmdline = manifest["cmdline"]
        .as_str()
        .unwrap_or("console=ttyS0 quiet")
        .to_string();
    if let Err(e) = c
        .image_create()
        .body(types::ImageCreate {
            name: name("stratus-guest")?,
            project: Some("demo".into()),
            visibility: Some(types::ImageVisibility::Public),
            path: Some(disk.display().to_string()),
            format: Some(types::ImageFormat::Qcow2),
            kernel_path: Some(kernel.display().to_string()),
            initrd_path: Some(initrd.display().to_string()),
            cmdline: Some(cmdline),
        })
        .send()
        .await
    {
        if !is_conflict(&e) {
            return Err(anyhow::anyhow!("registering the demo image: {e}"));
        }
    }
    match c
        .vm_create()
        .body(types::VmCreate {
            name: name("demo")?,
            project: Some("demo".into()),
            flavor: "tiny".into(),
            image: "stratus-guest".into(),
            start: Some(true),
            zone: None,
            cluster: None,
            require_tags: vec![],
            forbid_tags: vec![],
            group: None,
            restart_policy: None,
            pool: None,
        })
        .send()
        .await
    {
        Ok(op) => Ok(format!(
            "demo VM `demo` is booting (job {}); watch it with: stratus vm console demo --project demo --follow",
            op.into_inner().job.id
        )),
        Err(e) if is_conflict(&e) => Ok("demo VM: `stratus vm show demo --project demo`".into()),
        Err(e) => Err(anyhow::anyhow!("creating the demo VM: {e}")),
    }
}

/// Gives the all-in-one cloud a backup target, `local` at `dir`, unless it
/// has one already: `stratus backup create VM` then works out of the box.
pub async fn ensure_backup_target(url: &str, token: &str, dir: &Path) -> anyhow::Result<String> {
    let c = client(url, token)?;
    let existing = c.backup_target_list().send().await?.into_inner();
    if let Some(t) = existing.first() {
        return Ok(format!("backups:     target {:?} at {}", t.name, t.path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let t = c
        .backup_target_create()
        .body(stratus_client::types::BackupTargetCreate {
            name: "local"
                .parse()
                .map_err(|e| anyhow::anyhow!("target name: {e}"))?,
            path: dir.to_string_lossy().into_owned(),
        })
        .send()
        .await?
        .into_inner();
    Ok(format!(
        "backups:     target {:?} at {} (created now)",
        t.name, t.path
    ))
}
