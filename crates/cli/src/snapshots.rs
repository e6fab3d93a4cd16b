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
    /// Scheduled snapshots that rotate by themselves
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Set a VM's snapshot schedule and how many of its snapshots to keep
    /// (replaces its policy); older ones are merged away automatically
    Set {
        vm: String,
        /// Snapshot at most this often: 90s, 30m, 6h, 1d, 1w [default: no
        /// schedule, only `policy run`]
        #[arg(long, value_parser = crate::backups::parse_every)]
        every: Option<u64>,
        /// Keep the policy's newest N snapshots (1-15); an operator's
        /// snapshots are never deleted by it
        #[arg(long)]
        keep: u32,
        #[arg(long)]
        project: Option<String>,
    },
    /// Take the policy's snapshot now
    Run {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Show a VM's snapshot policy
    Show {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// List snapshot policies
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Remove a VM's snapshot policy (its snapshots stay)
    Delete {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
}

fn policy_fields(p: &types::SnapshotPolicy) -> Table {
    fields(vec![
        ("vm", p.vm_id.to_string()),
        (
            "every",
            p.every_secs
                .map(|s| format!("{s} s"))
                .unwrap_or_else(|| "- (no schedule)".into()),
        ),
        ("keep", p.keep.to_string()),
        ("updated", ts(&p.updated_at)),
    ])
}

async fn policy(c: &Client, f: Format, cmd: PolicyCmd, interactive: bool) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Set {
            vm,
            every,
            keep,
            project,
        } => {
            let mut r = c
                .snapshot_policy_set()
                .vm(&vm)
                .body(types::SnapshotPolicySet {
                    every_secs: every,
                    keep,
                });
            if let Some(p) = &project {
                r = r.project(p);
            }
            let p = r.send().await?.into_inner();
            output::print(f, &p, policy_fields);
        }
        PolicyCmd::Run { vm, project, wait } => {
            let mut r = c.snapshot_policy_run().vm(&vm);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            operation(c, f, op, &vm, project.as_deref(), wait, interactive).await?;
        }
        PolicyCmd::Show { vm, project } => {
            let mut r = c.snapshot_policy_view().vm(&vm);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let p = r.send().await?.into_inner();
            output::print(f, &p, policy_fields);
        }
        PolicyCmd::List { project } => {
            let mut r = c.snapshot_policy_list();
            if let Some(p) = &project {
                r = r.project(p);
            }
            let items = r.send().await?.into_inner();
            print_list(f, items, None, |items| {
                let mut t = Table::new(&["VM", "EVERY", "KEEP"]);
                for p in items {
                    t.row(vec![
                        p.vm_id.to_string(),
                        p.every_secs
                            .map(|s| format!("{s} s"))
                            .unwrap_or_else(|| "-".into()),
                        p.keep.to_string(),
                    ]);
                }
                t
            });
        }
        PolicyCmd::Delete { vm, project } => {
            let mut r = c.snapshot_policy_delete().vm(&vm);
            if let Some(p) = &project {
                r = r.project(p);
            }
            r.send().await?;
            output::print(f, &serde_json::json!({ "deleted_policy_of": vm }), |v| {
                fields(vec![(
                    "deleted policy of",
                    v["deleted_policy_of"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )])
            });
        }
    }
    Ok(())
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
        (
            "taken by",
            if s.scheduled { "policy" } else { "operator" }.into(),
        ),
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
                    "NAME", "STATUS", "QUIESCED", "SIZE", "VOLUMES", "BY", "CREATED", "ID",
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
                        if s.scheduled { "policy" } else { "operator" }.to_string(),
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
        SnapshotCmd::Policy(p) => policy(c, f, p, interactive).await?,
    }
    Ok(())
}
