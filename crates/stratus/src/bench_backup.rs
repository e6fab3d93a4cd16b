//! `stratus bench backup`: how much an incremental backup copies against
//! what the guest wrote. A `stratus up` child cloud boots the test guest;
//! for each size the guest writes that many MiB of random data into a file
//! (and syncs), an incremental backup is taken through the API, and the
//! backup's data bytes (clusters copied, measured by the host from the
//! file's own layer) are set against the bytes written. The file is then
//! removed, so the disk never fills.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use stratus_client::types;

use crate::bench::{client, start_cloud};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// MiB written before each incremental backup, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    sizes: Vec<u64>,
    /// The test guest (scripts/build-guest-image.sh)
    #[arg(long)]
    guest_dir: Option<std::path::PathBuf>,
}

async fn wait_job(c: &stratus_client::Client, id: &str) -> anyhow::Result<()> {
    let job = c
        .job_wait()
        .job(id.to_string())
        .timeout_secs(300u32)
        .send()
        .await?
        .into_inner();
    if job.state != types::JobState::Succeeded {
        bail!("job {id} ended {:?}: {:?}", job.state, job.error);
    }
    Ok(())
}

async fn exec(c: &stratus_client::Client, vm: &str, script: &str) -> anyhow::Result<()> {
    let out = c
        .vm_exec()
        .vm(vm.to_string())
        .body(types::VmExec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs: Some(300),
        })
        .send()
        .await?
        .into_inner();
    if out.exit_code != 0 {
        bail!("{script:?} exited {}", out.exit_code);
    }
    Ok(())
}

async fn backup(c: &stratus_client::Client, vm: &str) -> anyhow::Result<(types::Backup, Duration)> {
    let t = Instant::now();
    let op = c
        .backup_create()
        .vm(vm.to_string())
        .body(types::BackupCreate {
            full: Some(false),
            target: None,
        })
        .send()
        .await?
        .into_inner();
    wait_job(c, &op.job.id.to_string()).await?;
    let took = t.elapsed();
    let b = c
        .backup_view()
        .backup(op.backup.id.to_string())
        .send()
        .await?
        .into_inner();
    Ok((b, took))
}

pub async fn backup_bench(a: BackupArgs) -> anyhow::Result<()> {
    let guest = a
        .guest_dir
        .or_else(crate::demo::default_guest_dir)
        .context("no guest dir; pass --guest-dir")?;
    println!(
        "bench backup: guest {}, MiB written before each incremental backup: {:?}",
        guest.display(),
        a.sizes
    );
    let cloud = start_cloud()?;
    let c = client(&cloud.url, &cloud.token)?;
    let line = crate::demo::seed(&cloud.url, &cloud.token, &guest).await?;
    println!("{line}");
    // The demo VM (project demo) is the guest under test.
    let vms = c.vm_list().project("demo").send().await?.into_inner();
    let vm = vms.items.first().context("the demo VM was not created")?;
    let id = vm.id.to_string();
    let t = Instant::now();
    loop {
        let v = c.vm_view().vm(id.clone()).send().await?.into_inner();
        if v.guest.as_ref().is_some_and(|g| g.connected) {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the guest agent did not connect within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (full, took) = backup(&c, &id).await?;
    println!(
        "full: {} bytes of data (disk {} bytes) in {:.0} ms",
        full.data_bytes.unwrap_or(0),
        full.disk_bytes,
        took.as_secs_f64() * 1000.0
    );
    let mut worst = 0i64;
    for mib in &a.sizes {
        exec(
            &c,
            &id,
            &format!("dd if=/dev/urandom of=/mnt/disk/bench bs=1M count={mib} 2>/dev/null && sync"),
        )
        .await?;
        let (b, took) = backup(&c, &id).await?;
        if b.mode != Some(types::BackupMode::Incremental) {
            bail!("the backup after {mib} MiB was not incremental: {b:?}");
        }
        let written = mib << 20;
        let data = b.data_bytes.unwrap_or(0);
        let extra = data as i64 - written as i64;
        worst = worst.max(extra);
        println!(
            "  wrote {mib:>3} MiB = {written:>9} bytes; backup holds {data:>9} bytes \
             ({:+} bytes, {:.3}x), file {} bytes, {:.0} ms",
            extra,
            data as f64 / written as f64,
            b.file_bytes.unwrap_or(0),
            took.as_secs_f64() * 1000.0
        );
        exec(&c, &id, "rm -f /mnt/disk/bench && sync").await?;
        // The removal is itself a change; a backup takes it out of the next measure.
        backup(&c, &id).await?;
    }
    // VMs outlive their agent: remove this one before the cloud stops.
    let op = c.vm_delete().vm(id.clone()).send().await?.into_inner();
    wait_job(&c, &op.job.id.to_string()).await?;
    println!(
        "backup: incrementals copied at most {worst} bytes beyond what was written \
         (bitmap granularity 65536 bytes; the rest is file-system metadata)"
    );
    Ok(())
}
