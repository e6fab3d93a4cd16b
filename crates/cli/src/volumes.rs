//! `stratus volume …`: data volumes.

use clap::Subcommand;
use stratus_client::types;
use stratus_client::Client;
use stratus_common::ByteCount;

use crate::commands::{name, pages, print_list, ts, ListOpts, WaitOpt};
use crate::output::{self, bytes, fields, opt, wire, Format, Table};
use crate::wait::wait_for_job;
use crate::CliError;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume, blank or a copy-on-write clone of an image
    Create {
        name: String,
        /// e.g. 10GiB
        #[arg(long)]
        size: ByteCount,
        /// Start as a clone of this image
        #[arg(long)]
        image: Option<String>,
        /// Keep its file in this shared storage pool (then it can be
        /// attached to VMs on every host that sees the pool); default
        /// `local`: the host it is first attached on
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Attach a volume to a VM (hot-plugged while it runs)
    Attach {
        volume: String,
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Detach a volume from its VM (hot-unplugged while it runs)
    Detach {
        volume: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Grow a volume (live when attached to a running VM)
    Resize {
        volume: String,
        #[arg(long)]
        size: ByteCount,
        #[arg(long)]
        project: Option<String>,
    },
    /// Delete a volume that is not attached
    Delete {
        volume: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// List volumes
    List {
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a volume
    Show {
        volume: String,
        #[arg(long)]
        project: Option<String>,
    },
}

fn volume_fields(v: &types::Volume) -> Table {
    fields(vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("status", wire(&v.status)),
        ("size", bytes(v.size_bytes)),
        ("image", opt(&v.image_id)),
        ("vm", opt(&v.vm_id)),
        ("host", opt(&v.host_id)),
        ("pool", pool_name(v)),
        ("created", ts(&v.created_at)),
    ])
}

/// The volume's pool as the operator names it: `local` for a host's own.
fn pool_name(v: &types::Volume) -> String {
    v.pool.clone().unwrap_or_else(|| "local".into())
}

async fn show(c: &Client, f: Format, volume: &str, project: Option<&str>) -> Result<(), CliError> {
    let mut r = c.volume_view().volume(volume);
    if let Some(p) = project {
        r = r.project(p);
    }
    let v = r.send().await?.into_inner();
    output::print(f, &v, volume_fields);
    Ok(())
}

async fn operation(
    c: &Client,
    f: Format,
    op: types::VolumeOperation,
    project: Option<&str>,
    wait: WaitOpt,
    interactive: bool,
) -> Result<(), CliError> {
    if !wait.wait {
        output::print(f, &op, |op| {
            let mut t = volume_fields(&op.volume);
            t.row(vec!["job".into(), op.job.id.to_string()]);
            t
        });
        return Ok(());
    }
    wait_for_job(c, &op.job.id.to_string(), interactive).await?;
    show(c, f, &op.volume.id.to_string(), project).await
}

pub async fn volume(
    c: &Client,
    f: Format,
    cmd: VolumeCmd,
    interactive: bool,
) -> Result<(), CliError> {
    match cmd {
        VolumeCmd::Create {
            name: n,
            size,
            image,
            pool,
            project,
        } => {
            let v = c
                .volume_create()
                .body(types::VolumeCreate {
                    name: name(&n)?,
                    project,
                    size_bytes: size.bytes(),
                    image,
                    pool,
                })
                .send()
                .await?
                .into_inner();
            output::print(f, &v, volume_fields);
        }
        VolumeCmd::Attach {
            volume,
            vm,
            project,
            wait,
        } => {
            let mut r = c
                .volume_attach()
                .volume(&volume)
                .body(types::VolumeAttach { vm });
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            operation(c, f, op, project.as_deref(), wait, interactive).await?;
        }
        VolumeCmd::Detach {
            volume,
            project,
            wait,
        } => {
            let mut r = c.volume_detach().volume(&volume);
            if let Some(p) = &project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            operation(c, f, op, project.as_deref(), wait, interactive).await?;
        }
        VolumeCmd::Resize {
            volume,
            size,
            project,
        } => {
            let mut r = c.volume_resize().volume(&volume).body(types::VolumeResize {
                size_bytes: size.bytes(),
            });
            if let Some(p) = &project {
                r = r.project(p);
            }
            let v = r.send().await?.into_inner();
            output::print(f, &v, volume_fields);
        }
        VolumeCmd::Delete { volume, project } => {
            let mut r = c.volume_delete().volume(&volume);
            if let Some(p) = &project {
                r = r.project(p);
            }
            r.send().await?;
            output::print_deleted(f, &volume);
        }
        VolumeCmd::List { project, page } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let project = project.clone();
                async move {
                    let mut r = c.volume_list().limit(limit);
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
                let mut t = Table::new(&["NAME", "STATUS", "SIZE", "POOL", "VM", "ID"]);
                for v in items {
                    t.row(vec![
                        v.name.clone(),
                        wire(&v.status),
                        bytes(v.size_bytes),
                        pool_name(v),
                        opt(&v.vm_id),
                        v.id.to_string(),
                    ]);
                }
                t
            });
        }
        VolumeCmd::Show { volume, project } => show(c, f, &volume, project.as_deref()).await?,
    }
    Ok(())
}
