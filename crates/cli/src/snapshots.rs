//! `stratus snapshot …`: disk snapshots of a VM.

use clap::Subcommand;
use stratus_client::types;
use stratus_client::Client;

use crate::commands::{print_list, ts, vm_operation, WaitOpt};
use crate::output::{self, bytes, fields, wire, Format, Table};
use crate::wait::wait_for_job;
use crate::CliError;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a VM's disk and its attached volumes in one operation (live
    /// when it runs, the guest's file systems frozen)
    Create {
        vm: String,
        name: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// A VM's snapshots, oldest first
    List {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// Revert a stopped VM's disks to a snapshot (later snapshots are
    /// dropped; volumes attached after it are left as they are)
    Revert {
        vm: String,
        name: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Delete a snapshot, merging its layer (live when the VM runs)
    Delete {
        vm: String,
        name: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
}

fn snapshot_fields(s: &types::Snapshot) -> Table {
    fields(vec![
        ("name", s.name.clone()),
        ("id", s.id.to_string()),
        ("vm", s.vm_id.to_string()),
        ("status", wire(&s.status)),
        (
            "quiesced",
            match s.quiesced {
                Some(true) => "yes (file systems frozen)".into(),
                Some(false) => "no (crash-consistent)".into(),
                None => "-".into(),
            },
        ),
        ("size", s.bytes.map(bytes).unwrap_or_else(|| "-".into())),
        ("volumes", volume_list(&s.volumes)),
        ("created", ts(&s.created_at)),
        ("job", s.job_id.to_string()),
    ])
}

/// The volumes a snapshot covers, for a table cell.
fn volume_list(volumes: &[types::VolumeId]) -> String {
    if volumes.is_empty() {
        "-".into()
    } else {
        volumes
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Prints a snapshot operation; with `--wait`, waits for its job first and
/// shows the snapshot as it ended (or that it is gone).
async fn operation(
    c: &Client,
    f: Format,
    op: types::SnapshotOperation,
    vm: &str,
    project: Option<&str>,
    wait: WaitOpt,
    interactive: bool,
) -> Result<(), CliError> {
    if !wait.wait {
        output::print(f, &op, |op| snapshot_fields(&op.snapshot));
        return Ok(());
    }
    wait_for_job(c, &op.job.id.to_string(), interactive).await?;
    let mut r = c.snapshot_list().vm(vm);
    if let Some(p) = project {
        r = r.project(p);
    }
    let now = r.send().await?.into_inner();
    match now.into_iter().find(|s| s.id.0 == op.snapshot.id.0) {
        Some(s) => output::print(f, &s, snapshot_fields),
        None => output::print_deleted(f, &op.snapshot.name),
    }
    Ok(())
}

pub async fn snapshot(
    c: &Client,
    f: Format,
    cmd: SnapshotCmd,
    interactive: bool,
) -> Result<(), CliError> {
    match cmd {
        SnapshotCmd::Create {
            vm,
            name,
            project,
            wait,
        } => {
            let mut r = c
                .snapshot_create()
                .vm(&vm)
                .body(types::SnapshotCreate { name });
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            operation(c, f, op, &vm, project.as_deref(), wait, interactive).await?;
        }
        SnapshotCmd::List { vm, project } => {
            let mut r = c.snapshot_list().vm(&vm);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let items = r.send().await?.into_inner();
            print_list(f, items, None, |items| {
                let mut t = Table::new(&[
                    "NAME", "STATUS", "QUIESCED", "SIZE", "VOLUMES", "CREATED", "ID",
                ]);
                for s in items {
                    t.row(vec![
                        s.name.clone(),
                        wire(&s.status),
                        s.quiesced
                            .map(|q| if q { "yes" } else { "no" }.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.bytes.map(bytes).unwrap_or_else(|| "-".into()),
                        volume_list(&s.volumes),
                        ts(&s.created_at),
                        s.id.to_string(),
                    ]);
                }
                t
            });
        }
        SnapshotCmd::Revert {
            vm,
            name,
            project,
            wait,
        } => {
            let mut r = c.snapshot_revert().vm(&vm).snapshot(&name);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            vm_operation(c, f, op, wait, interactive, false).await?;
        }
        SnapshotCmd::Delete {
            vm,
            name,
            project,
            wait,
        } => {
            let mut r = c.snapshot_delete().vm(&vm).snapshot(&name);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            operation(c, f, op, &vm, project.as_deref(), wait, interactive).await?;
        }
    }
    Ok(())
}
