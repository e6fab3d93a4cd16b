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
    /// Back up a running VM's disk and attached volumes: incremental to its last backup, or full
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
    /// Restore a backup into a new VM (--as NAME, with a new volume per backed-up volume,
    /// named NAME-VOLUME) or over its stopped VM and its volumes (--in-place)
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
    /// Delete a backup (a restore point is merged into the one built on it)
    Delete { id: String },
    /// Backup schedules and retention, per VM
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Backup targets: directories every host sees (admin)
    #[command(subcommand)]
    Target(TargetCmd),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Set a VM's backup schedule and retention (replaces its policy)
    Set {
        vm: String,
        /// Back up at most this often: 90s, 30m, 6h, 1d, 1w [default: no schedule]
        #[arg(long, value_parser = parse_every)]
        every: Option<u64>,
        /// Keep the newest N restore points
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest restore point of each of the last N days
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        /// Keep the newest restore point of each of the last N weeks
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        /// Backup target for scheduled backups
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Show a VM's backup policy
    Show {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// List backup policies
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Remove a VM's backup policy (its backups stay)
    Delete {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
}

/// `90s`, `30m`, `6h`, `1d`, `1w` (or plain seconds) as seconds.
pub(crate) fn parse_every(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration like 90s, 30m, 6h, 1d or 1w"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{v:?}: the unit must be s, m, h, d or w")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{v:?} is too long"))
}

fn policy_fields(p: &types::BackupPolicy) -> Table {
    fields(vec![
        ("vm", p.vm_id.to_string()),
        (
            "every",
            p.every_secs
                .map(|s| format!("{s} s"))
                .unwrap_or_else(|| "- (no schedule)".into()),
        ),
        ("keep last", p.keep_last.to_string()),
        ("keep daily", p.keep_daily.to_string()),
        ("keep weekly", p.keep_weekly.to_string()),
        ("target", opt(&p.target_id)),
        ("updated", ts(&p.updated_at)),
    ])
}

async fn policy(c: &Client, f: Format, cmd: PolicyCmd) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Set {
            vm,
            every,
            keep_last,
            keep_daily,
            keep_weekly,
            target,
            project,
        } => {
            let mut r = c.backup_policy_set().vm(&vm).body(types::BackupPolicySet {
                every_secs: every,
                keep_last: Some(keep_last),
                keep_daily: Some(keep_daily),
                keep_weekly: Some(keep_weekly),
                target,
            });
            if let Some(p) = &project {
                r = r.project(p);
            }
            let p = r.send().await?.into_inner();
            output::print(f, &p, policy_fields);
        }
        PolicyCmd::Show { vm, project } => {
            let mut r = c.backup_policy_view().vm(&vm);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let p = r.send().await?.into_inner();
            output::print(f, &p, policy_fields);
        }
        PolicyCmd::List { project } => {
            let mut r = c.backup_policy_list();
            if let Some(p) = &project {
                r = r.project(p);
            }
            let items = r.send().await?.into_inner();
            print_list(f, items, None, |items| {
                let mut t = Table::new(&["VM", "EVERY", "LAST", "DAILY", "WEEKLY"]);
                for p in items {
                    t.row(vec![
                        p.vm_id.to_string(),
                        p.every_secs
                            .map(|s| format!("{s} s"))
                            .unwrap_or_else(|| "-".into()),
                        p.keep_last.to_string(),
                        p.keep_daily.to_string(),
                        p.keep_weekly.to_string(),
                    ]);
                }
                t
            });
        }
        PolicyCmd::Delete { vm, project } => {
            let mut r = c.backup_policy_delete().vm(&vm);
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
    let mut t = fields(vec![
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
    ]);
    // One block of lines per volume the restore point covers.
    for v in &b.volumes {
        let mode = match &v.fallback_reason {
            Some(why) => format!("{} ({why})", wire(&v.mode)),
            None => wire(&v.mode),
        };
        t.row(vec![
            "volume".into(),
            format!("{} ({})", v.volume_name, v.volume_id),
        ]);
        t.row(vec!["  mode".into(), mode]);
        t.row(vec!["  size".into(), bytes(v.disk_bytes)]);
        t.row(vec!["  data".into(), bytes(v.data_bytes)]);
        t.row(vec!["  file size".into(), bytes(v.file_bytes)]);
        t.row(vec!["  file".into(), v.file.clone()]);
        t.row(vec!["  sha256".into(), v.sha256.clone()]);
    }
    t
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
                let mut t = Table::new(&[
                    "ID",
                    "VM",
                    "STATUS",
                    "MODE",
                    "DATA",
                    "FILE SIZE",
                    "VOLUMES",
                    "CREATED",
                ]);
                for b in items {
                    // DATA and FILE SIZE: the disk's and every volume's.
                    let volumes_data: u64 = b.volumes.iter().map(|v| v.data_bytes).sum();
                    let volumes_file: u64 = b.volumes.iter().map(|v| v.file_bytes).sum();
                    t.row(vec![
                        b.id.to_string(),
                        b.vm_name.clone(),
                        wire(&b.status),
                        b.mode
                            .as_ref()
                            .map(wire)
                            .unwrap_or_else(|| wire(&b.requested_mode)),
                        b.data_bytes
                            .map(|d| bytes(d + volumes_data))
                            .unwrap_or_else(|| "-".into()),
                        b.file_bytes
                            .map(|d| bytes(d + volumes_file))
                            .unwrap_or_else(|| "-".into()),
                        if b.volumes.is_empty() {
                            "-".into()
                        } else {
                            b.volumes
                                .iter()
                                .map(|v| v.volume_name.clone())
                                .collect::<Vec<_>>()
                                .join(",")
                        },
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
        BackupCmd::Delete { id } => {
            c.backup_delete().backup(&id).send().await?;
            output::print_deleted(f, &id);
        }
        BackupCmd::Policy(p) => policy(c, f, p).await?,
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
            output::print_deleted(f, &target);
        }
    }
    Ok(())
}
