//! `stratus backup …`: backup targets (admin), taking, listing, verifying and
//! restoring backups.

use clap::Subcommand;
use stratus_client::types;
use stratus_client::Client;

use crate::commands::{name, pages, print_list, ts, vm_operation, ListOpts, WaitOpt};
use crate::output::{self, bytes, fields, opt, wire, Format, Table};
use crate::wait::wait_for_job;
use crate::CliError;

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a running VM's disk: incremental to its last backup, or full
    Create {
        vm: String,
        /// A full backup even when an incremental one is possible
        #[arg(long)]
        full: bool,
        /// Backup target (default: the VM's last one, else the only one)
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// List backups (of one VM when named), oldest first
    List {
        vm: Option<String>,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a backup
    Show { id: String },
    /// Read a backup back on a host: checksum and qemu-img check over its chain
    Verify { id: String },
    /// Restore a backup into a new VM (--as NAME) or over its stopped VM (--in-place)
    Restore {
        id: String,
        /// Name of the new VM
        #[arg(long = "as", value_name = "NEW_VM", conflicts_with = "in_place")]
        as_vm: Option<String>,
        /// Replace the disk of the (stopped) VM the backup was taken of
        #[arg(long)]
        in_place: bool,
        /// Leave the new VM stopped
        #[arg(long, conflicts_with = "in_place")]
        no_start: bool,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Backup targets: directories every host sees (admin)
    #[command(subcommand)]
    Target(TargetCmd),
}

#[derive(Subcommand, Debug)]
pub enum TargetCmd {
    /// Add a directory backups can be written to (the same path on every host)
    Create { name: String, path: String },
    /// List backup targets
    List,
    /// Remove a target that holds no backups
    Delete { target: String },
}

fn backup_fields(b: &types::Backup) -> Table {
    let mode = match (&b.mode, &b.fallback_reason) {
        (Some(m), Some(why)) => format!("{} (asked {}: {why})", wire(m), wire(&b.requested_mode)),
        (Some(m), None) => wire(m),
        (None, _) => format!("{} (asked)", wire(&b.requested_mode)),
    };
    fields(vec![
        ("id", b.id.to_string()),
        ("vm", format!("{} ({})", b.vm_name, b.vm_id)),
        ("status", wire(&b.status)),
        ("mode", mode),
        ("parent", opt(&b.parent_id)),
        ("disk", bytes(b.disk_bytes)),
        (
            "data",
            b.data_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        ),
        (
            "file size",
            b.file_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        ),
        ("file", b.file.clone()),
        ("sha256", opt(&b.sha256)),
        (
            "duration",
            b.duration_ms
                .map(|d| format!("{:.1} s", d as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ),
        ("created", ts(&b.created_at)),
        (
            "verified",
            match (&b.verified_at, b.verify_ok) {
                (Some(at), Some(true)) => format!("ok at {}", ts(at)),
                (Some(at), _) => format!("FAILED at {}", ts(at)),
                _ => "-".into(),
            },
        ),
        ("error", opt(&b.error)),
        ("job", b.job_id.to_string()),
    ])
}

pub async fn backup(
    c: &Client,
    f: Format,
    cmd: BackupCmd,
    interactive: bool,
) -> Result<(), CliError> {
    match cmd {
        BackupCmd::Create {
            vm,
            full,
            target,
            project,
            wait,
        } => {
            let mut req = c.backup_create().vm(&vm).body(types::BackupCreate {
                full: Some(full),
                target,
            });
            if let Some(p) = &project {
                req = req.project(p);
            }
            let op = req.send().await?.into_inner();
            if wait.wait {
                wait_for_job(c, &op.job.id.to_string(), interactive).await?;
                let b = c
                    .backup_view()
                    .backup(op.backup.id.to_string())
                    .send()
                    .await?
                    .into_inner();
                output::print(f, &b, backup_fields);
            } else {
                output::print(f, &op, |op| backup_fields(&op.backup));
            }
        }
        BackupCmd::List { vm, project, page } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let (vm, project) = (vm.clone(), project.clone());
                async move {
                    let mut r = c.backup_list().limit(limit);
                    if let Some(v) = vm {
                        r = r.vm(v);
                    }
                    if let Some(p) = project {
                        r = r.project(p);
                    }
                    if let Some(cur) = cursor {
                        r = r.cursor(cur);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t =
                    Table::new(&["ID", "VM", "STATUS", "MODE", "DATA", "FILE SIZE", "CREATED"]);
                for b in items {
                    t.row(vec![
                        b.id.to_string(),
                        b.vm_name.clone(),
                        wire(&b.status),
                        b.mode
                            .as_ref()
                            .map(wire)
                            .unwrap_or_else(|| wire(&b.requested_mode)),
                        b.data_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                        b.file_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                        ts(&b.created_at),
                    ]);
                }
                t
            });
        }
        BackupCmd::Show { id } => {
            let b = c.backup_view().backup(&id).send().await?.into_inner();
            output::print(f, &b, backup_fields);
        }
        BackupCmd::Verify { id } => {
            let v = c.backup_verify().backup(&id).send().await?.into_inner();
            let ok = v.ok;
            output::print(f, &v, |v| {
                let mut t = fields(vec![
                    ("backup", v.backup.id.to_string()),
                    ("result", if v.ok { "ok".into() } else { "FAILED".into() }),
                    ("sha256", v.sha256.clone()),
                ]);
                for p in &v.problems {
                    t.row(vec!["problem".into(), p.clone()]);
                }
                t
            });
            if !ok {
                return Err(CliError::Usage(format!("backup {id} failed verification")));
            }
        }
        BackupCmd::Restore {
            id,
            as_vm,
            in_place,
            no_start,
            wait,
        } => {
            if as_vm.is_none() && !in_place {
                return Err(CliError::Usage(
                    "give --as NEW_VM (restore into a new VM) or --in-place".into(),
                ));
            }
            let body = types::BackupRestore {
                as_vm: as_vm.as_deref().map(name).transpose()?,
                in_place: Some(in_place),
                start: as_vm.as_ref().map(|_| !no_start),
            };
            let op = c
                .backup_restore()
                .backup(&id)
                .body(body)
                .send()
                .await?
                .into_inner();
            vm_operation(c, f, op, wait, interactive, false).await?;
        }
        BackupCmd::Target(t) => target(c, f, t).await?,
    }
    Ok(())
}

async fn target(c: &Client, f: Format, cmd: TargetCmd) -> Result<(), CliError> {
    let one = |t: &types::BackupTarget| {
        fields(vec![
            ("name", t.name.clone()),
            ("id", t.id.to_string()),
            ("path", t.path.clone()),
            ("created", ts(&t.created_at)),
        ])
    };
    match cmd {
        TargetCmd::Create { name: n, path } => {
            let t = c
                .backup_target_create()
                .body(types::BackupTargetCreate {
                    name: name(&n)?,
                    path,
                })
                .send()
                .await?
                .into_inner();
            output::print(f, &t, one);
        }
        TargetCmd::List => {
            let items = c.backup_target_list().send().await?.into_inner();
            print_list(f, items, None, |items| {
                let mut t = Table::new(&["NAME", "PATH", "ID"]);
                for x in items {
                    t.row(vec![x.name.clone(), x.path.clone(), x.id.to_string()]);
                }
                t
            });
        }
        TargetCmd::Delete { target } => {
            c.backup_target_delete().target(&target).send().await?;
            output::print(f, &serde_json::json!({ "deleted": target }), |v| {
                fields(vec![(
                    "deleted",
                    v["deleted"].as_str().unwrap_or_default().to_string(),
                )])
            });
        }
    }
    Ok(())
}
