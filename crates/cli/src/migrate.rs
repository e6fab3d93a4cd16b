//! `stratus vm migrate` and `stratus host maintenance`: moving VMs between
//! hosts, with a progress bar under `--wait`.

use clap::ValueEnum;
use stratus_client::types;
use stratus_client::Client;
use stratus_common::ByteCount;

use crate::commands::{vm_operation, WaitOpt};
use crate::output::{self, fields, opt, Format, Table};
use crate::wait::wait_for_job;
use crate::CliError;

/// `stratus vm migrate VM ...`
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    pub vm: String,
    #[arg(long)]
    pub project: Option<String>,
    /// Destination host (still checked by the scheduler) [default: the
    /// scheduler's choice]
    #[arg(long)]
    pub host: Option<String>,
    /// Move the VM stopped, its disk copied (a stopped VM always moves cold)
    #[arg(long)]
    pub cold: bool,
    /// Most bytes per second the migration may use, e.g. 100MiB
    #[arg(long)]
    pub bandwidth: Option<ByteCount>,
    /// Slow the guest's vCPUs down when its memory changes faster than it
    /// can be sent
    #[arg(long)]
    pub auto_converge: bool,
    /// Switch to post-copy after this many pre-copy passes
    #[arg(long, value_name = "PASSES")]
    pub postcopy_after: Option<u32>,
    /// Storage pool for the disk at the destination (a shared pool or
    /// local): the pool mapping of a move across clusters [default: the
    /// pool it is in]
    #[arg(long)]
    pub pool: Option<String>,
    #[command(flatten)]
    pub wait: WaitOpt,
}

pub async fn vm_migrate(
    c: &Client,
    f: Format,
    a: MigrateArgs,
    interactive: bool,
) -> Result<(), CliError> {
    let mut r = c.vm_migrate().vm(a.vm).body(types::VmMigrate {
        host: a.host,
        cold: Some(a.cold),
        bandwidth: a.bandwidth.map(|b| b.bytes()),
        auto_converge: Some(a.auto_converge),
        postcopy_after_passes: a.postcopy_after,
        pool: a.pool,
    });
    if let Some(p) = a.project {
        r = r.project(p);
    }
    let op = r.send().await?.into_inner();
    vm_operation(c, f, op, a.wait, interactive, false).await
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

pub async fn host_maintenance(
    c: &Client,
    f: Format,
    host: String,
    mode: OnOff,
    wait: WaitOpt,
    interactive: bool,
) -> Result<(), CliError> {
    let m = c
        .host_maintenance()
        .host(host)
        .body(types::HostMaintenanceSet {
            enabled: matches!(mode, OnOff::On),
        })
        .send()
        .await?
        .into_inner();
    let table = |m: &types::HostMaintenance| {
        let mut t = Table::new(&["VM", "TO", "JOB", "STATUS"]);
        for v in &m.vms {
            t.row(vec![
                v.name.clone(),
                opt(&v.target_host_id),
                opt(&v.job_id),
                v.error.clone().unwrap_or_else(|| "moving".into()),
            ]);
        }
        t
    };
    if !wait.wait {
        output::print(f, &m, |m| {
            if m.vms.is_empty() {
                fields(vec![
                    ("host", m.host.name.clone()),
                    ("state", output::wire(&m.host.state)),
                ])
            } else {
                table(m)
            }
        });
        return Ok(());
    }
    // Each move is its own job: wait for them one after the other (they
    // run together), reporting each as it ends.
    let mut failed = 0;
    let mut results = Vec::new();
    for v in &m.vms {
        let Some(job) = &v.job_id else {
            failed += 1;
            results.push((v.name.clone(), v.error.clone().unwrap_or_default()));
            continue;
        };
        if interactive {
            eprintln!("moving {}:", v.name);
        }
        let j = wait_for_job(c, &job.to_string(), interactive).await;
        let line = match j {
            Ok(j) => {
                if matches!(j.state, types::JobState::Succeeded) {
                    "moved".to_string()
                } else {
                    failed += 1;
                    j.error
                        .map(|e| e.message)
                        .unwrap_or_else(|| output::wire(&j.state))
                }
            }
            Err(e) => {
                failed += 1;
                e.to_string()
            }
        };
        results.push((v.name.clone(), line));
    }
    output::print(f, &m, |m| {
        let mut t = Table::new(&["VM", "RESULT"]);
        for (name, line) in &results {
            t.row(vec![name.clone(), line.clone()]);
        }
        if m.vms.is_empty() {
            t.row(vec!["-".into(), "no VMs on the host".into()]);
        }
        t
    });
    if failed > 0 {
        return Err(CliError::Exit(1));
    }
    Ok(())
}
