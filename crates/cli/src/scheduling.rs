//! Scheduling commands: clusters (admin), server groups, host tags, and
//! what `vm create --count/--dry-run` print.

use clap::{Subcommand, ValueEnum};
use stratus_client::types;
use stratus_client::Client;

use crate::output::{self, bytes, fields, Format, Table};
use crate::CliError;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// List clusters with their overcommit ratios and weigher
    List,
    /// Show a cluster
    Show { cluster: String },
    /// Change a cluster's scheduling policy
    Update {
        cluster: String,
        /// vCPU overcommit (e.g. 4.0)
        #[arg(long)]
        cpu_ratio: Option<f64>,
        /// Memory overcommit (e.g. 1.0)
        #[arg(long)]
        ram_ratio: Option<f64>,
        /// Disk overcommit (e.g. 1.0)
        #[arg(long)]
        disk_ratio: Option<f64>,
        /// spread: most free memory first; pack: fill hosts one by one
        #[arg(long, value_enum)]
        weigher: Option<WeigherArg>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeigherArg {
    Spread,
    Pack,
}

#[derive(Subcommand, Debug)]
pub enum ServerGroupCmd {
    /// Create a server group
    Create {
        name: String,
        #[arg(long, value_enum)]
        policy: PolicyArg,
        #[arg(long)]
        project: Option<String>,
    },
    /// List server groups
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Show a server group
    Show {
        group: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// Delete a server group without members
    Delete {
        group: String,
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PolicyArg {
    /// All members on one host, or refused
    Affinity,
    /// Every member on a different host, or refused
    AntiAffinity,
    /// Together where possible
    SoftAffinity,
    /// Apart where possible
    SoftAntiAffinity,
}

fn cluster_fields(c: &types::Cluster) -> Table {
    fields(vec![
        ("name", c.name.clone()),
        ("cpu ratio", format!("{}", c.cpu_ratio)),
        ("ram ratio", format!("{}", c.ram_ratio)),
        ("disk ratio", format!("{}", c.disk_ratio)),
        ("weigher", output::wire(&c.weigher)),
        ("hosts", c.hosts.to_string()),
    ])
}

fn group_fields(g: &types::ServerGroup) -> Table {
    fields(vec![
        ("name", g.name.clone()),
        ("id", g.id.to_string()),
        ("policy", output::wire(&g.policy)),
        ("members", g.members.to_string()),
        ("project", g.project_id.to_string()),
    ])
}

pub async fn cluster(c: &Client, f: Format, cmd: ClusterCmd) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::List => {
            let p = c.cluster_list().send().await?.into_inner();
            output::print(f, &p, |p| {
                let mut t = Table::new(&["NAME", "CPU", "RAM", "DISK", "WEIGHER", "HOSTS"]);
                for cl in &p.items {
                    t.row(vec![
                        cl.name.clone(),
                        format!("{}", cl.cpu_ratio),
                        format!("{}", cl.ram_ratio),
                        format!("{}", cl.disk_ratio),
                        output::wire(&cl.weigher),
                        cl.hosts.to_string(),
                    ]);
                }
                t
            });
        }
        ClusterCmd::Show { cluster } => {
            let cl = c.cluster_view().cluster(cluster).send().await?.into_inner();
            output::print(f, &cl, cluster_fields);
        }
        ClusterCmd::Update {
            cluster,
            cpu_ratio,
            ram_ratio,
            disk_ratio,
            weigher,
        } => {
            let body = types::ClusterUpdate {
                cpu_ratio,
                ram_ratio,
                disk_ratio,
                weigher: weigher.map(|w| match w {
                    WeigherArg::Spread => types::Weigher::Spread,
                    WeigherArg::Pack => types::Weigher::Pack,
                }),
            };
            let cl = c
                .cluster_update()
                .cluster(cluster)
                .body(body)
                .send()
                .await?
                .into_inner();
            output::print(f, &cl, cluster_fields);
        }
    }
    Ok(())
}

pub async fn server_group(c: &Client, f: Format, cmd: ServerGroupCmd) -> Result<(), CliError> {
    match cmd {
        ServerGroupCmd::Create {
            name,
            policy,
            project,
        } => {
            let body = types::ServerGroupCreate {
                name: crate::commands::name(&name)?,
                project,
                policy: match policy {
                    PolicyArg::Affinity => types::GroupPolicy::Affinity,
                    PolicyArg::AntiAffinity => types::GroupPolicy::AntiAffinity,
                    PolicyArg::SoftAffinity => types::GroupPolicy::SoftAffinity,
                    PolicyArg::SoftAntiAffinity => types::GroupPolicy::SoftAntiAffinity,
                },
            };
            let g = c
                .server_group_create()
                .body(body)
                .send()
                .await?
                .into_inner();
            output::print(f, &g, group_fields);
        }
        ServerGroupCmd::List { project } => {
            let every_page = crate::commands::ListOpts {
                limit: 1000,
                cursor: None,
                all: true,
            };
            let (items, _) = crate::commands::pages(&every_page, |limit, cursor| {
                let project = project.clone();
                async move {
                    let mut r = c.server_group_list().limit(limit);
                    if let Some(p) = project {
                        r = r.project(p);
                    }
                    if let Some(cu) = cursor {
                        r = r.cursor(cu);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            output::print(f, &items, |items| {
                let mut t = Table::new(&["NAME", "POLICY", "MEMBERS", "ID"]);
                for g in items {
                    t.row(vec![
                        g.name.clone(),
                        output::wire(&g.policy),
                        g.members.to_string(),
                        g.id.to_string(),
                    ]);
                }
                t
            });
        }
        ServerGroupCmd::Show { group, project } => {
            let mut r = c.server_group_view().group(group);
            if let Some(p) = project {
                r = r.project(p);
            }
            let g = r.send().await?.into_inner();
            output::print(f, &g, group_fields);
        }
        ServerGroupCmd::Delete { group, project } => {
            let mut r = c.server_group_delete().group(group.clone());
            if let Some(p) = project {
                r = r.project(p);
            }
            r.send().await?;
            output::print_deleted(f, &group);
        }
    }
    Ok(())
}

/// Prints a dry run's answer.
pub fn print_preview(f: Format, p: &types::PlacementPreview) {
    output::print(f, p, |p| {
        let mut t = Table::new(&["FIELD", "VALUE"]);
        t.row(vec!["fits".into(), p.fits.to_string()]);
        t.row(vec!["summary".into(), p.message.clone()]);
        for v in &p.placements {
            t.row(vec![
                format!("  {}", v.name),
                format!("-> {}", v.host.as_deref().unwrap_or("a host")),
            ]);
        }
        explanation_rows(&mut t, &p.explanation);
        t
    });
}

/// The scheduler's explanation as table rows (also used for a refused
/// create's error details).
pub fn explanation_rows(t: &mut Table, e: &types::PlacementExplanation) {
    t.row(vec![
        "hosts".into(),
        format!("{} in all, {} could take it", e.hosts_total, e.feasible),
    ]);
    for fc in &e.eliminated {
        t.row(vec![
            format!("  ruled out by {}", fc.filter),
            fc.hosts.to_string(),
        ]);
    }
    for n in &e.near_misses {
        let lacking: Vec<String> = n
            .lacking
            .iter()
            .map(|s| {
                let fmt = |v: u64| {
                    if s.resource == "vcpus" {
                        v.to_string()
                    } else {
                        bytes(v)
                    }
                };
                format!(
                    "{} needs {}, has {}",
                    s.resource,
                    fmt(s.needed),
                    fmt(s.available)
                )
            })
            .collect();
        t.row(vec![format!("  near miss {}", n.host), lacking.join("; ")]);
    }
}
