//! The client commands and what each prints.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use stratus_client::types;
use stratus_client::Client;
use stratus_common::ByteCount;

use crate::config::{self, ConfigFile};
use crate::output::{self, bytes, fields, opt, wire, Format, Table};
use crate::wait::wait_for_job;
use crate::CliError;

/// Options every client command takes.
#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// API URL [default: from the config file, else http://127.0.0.1:8480]
    #[arg(long, global = true, env = "STRATUS_URL")]
    pub url: Option<String>,
    /// API token
    #[arg(long, global = true, env = "STRATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Config file [default: $XDG_CONFIG_HOME/stratus/config.toml]
    #[arg(long, global = true, env = "STRATUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Projects: the unit of tenancy
    #[command(subcommand)]
    Project(ProjectCmd),
    /// API tokens
    #[command(subcommand)]
    Token(TokenCmd),
    /// Hypervisor hosts (admin)
    #[command(subcommand)]
    Host(HostCmd),
    /// Disk images
    #[command(subcommand)]
    Image(ImageCmd),
    /// VM sizes
    #[command(subcommand)]
    Flavor(FlavorCmd),
    /// Virtual machines
    #[command(subcommand)]
    Vm(VmCmd),
    /// Clusters and their scheduling policy (admin)
    #[command(subcommand)]
    Cluster(crate::scheduling::ClusterCmd),
    /// Server groups: VMs placed together or apart
    #[command(subcommand)]
    ServerGroup(crate::scheduling::ServerGroupCmd),
    /// Jobs: the operations carried out on hosts
    #[command(subcommand)]
    Job(JobCmd),
    /// Backups of VM disks: full, then incremental forever; verify, restore
    #[command(subcommand)]
    Backup(crate::backups::BackupCmd),
    /// Disk snapshots of a VM: take, list, revert, delete (merge)
    #[command(subcommand)]
    Snapshot(crate::snapshots::SnapshotCmd),
    /// Data volumes: create, attach (hot-plug), detach, resize, delete
    #[command(subcommand)]
    Volume(crate::volumes::VolumeCmd),
    /// Shared storage pools: directories several hosts mount, for VM disks
    #[command(subcommand)]
    Pool(crate::pools::PoolCmd),
    /// Show who the token is
    Whoami,
}

/// Paging for list commands.
#[derive(Args, Debug, Clone)]
pub struct ListOpts {
    /// Items per page (1-1000)
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Continue after this cursor (printed by the previous page)
    #[arg(long)]
    pub cursor: Option<String>,
    /// Fetch every page
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct WaitOpt {
    /// Wait for the job to finish, with a progress bar; exit non-zero if it fails
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// Create a project (admin)
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List projects
    List {
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a project
    Show { project: String },
    /// Delete an empty project (admin)
    Delete { project: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once
    Create {
        name: String,
        /// admin, member or reader
        #[arg(long)]
        role: String,
        /// Project (name or id) for member and reader tokens
        #[arg(long)]
        project: Option<String>,
        /// Expire after this many days
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens
    List {
        #[arg(long)]
        project: Option<String>,
        /// Include revoked tokens
        #[arg(long)]
        revoked: bool,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a token
    Show { id: String },
    /// Revoke a token
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// List hosts
    List {
        #[arg(long)]
        zone: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a host
    Show { host: String },
    /// Take a host out of service (on: no new VMs, every VM migrated away)
    /// or return it (off)
    Maintenance {
        host: String,
        #[arg(value_enum)]
        mode: crate::migrate::OnOff,
        /// Wait for every VM's move, with progress
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Change a host's tags
    Update {
        host: String,
        /// Tag to add (repeatable)
        #[arg(long = "add-tag", value_name = "TAG")]
        add_tags: Vec<String>,
        /// Tag to remove (repeatable)
        #[arg(long = "remove-tag", value_name = "TAG")]
        remove_tags: Vec<String>,
    },
    /// Print a one-time token for `stratus agent --enroll-token`
    EnrollToken {
        /// Hours until the token expires
        #[arg(long, default_value_t = 24)]
        expires_in_hours: u32,
        /// How many hosts may enroll with it
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Register an image from a file: uploaded from this machine (--file) or
    /// copied from the controller host (--path, admin)
    #[command(alias = "create")]
    Register {
        name: String,
        /// A qcow2 or raw file on this machine, uploaded
        #[arg(long, conflicts_with = "path", required_unless_present = "path")]
        file: Option<PathBuf>,
        /// A qcow2 or raw file on the controller host (admin)
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        project: Option<String>,
        /// Visible to every project (admin)
        #[arg(long)]
        public: bool,
        /// Refuse the file unless it is in this format (qcow2 or raw)
        #[arg(long)]
        format: Option<String>,
        /// Direct kernel boot: a kernel on the controller host (admin; with --path)
        #[arg(long, requires = "path")]
        kernel_path: Option<String>,
        /// Its initrd on the controller host (with --kernel-path)
        #[arg(long, requires = "kernel_path")]
        initrd_path: Option<String>,
        /// Kernel command line (console=ttyS0 is added when missing)
        #[arg(long, requires = "kernel_path")]
        cmdline: Option<String>,
    },
    /// List images
    List {
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show an image
    Show {
        image: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// Delete an image
    Delete {
        image: String,
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum FlavorCmd {
    /// Create a flavor (admin)
    Create {
        name: String,
        #[arg(long)]
        vcpus: u32,
        /// Memory, e.g. 256MiB or 1GiB
        #[arg(long)]
        memory: ByteCount,
        /// Root disk, e.g. 10GiB
        #[arg(long)]
        disk: ByteCount,
    },
    /// List flavors
    List {
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a flavor
    Show { flavor: String },
    /// Delete a flavor (admin)
    Delete { flavor: String },
}

/// A VM's restart policy on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicyArg {
    /// The VM stays down after a crash until someone starts it
    Never,
    /// The controller starts the VM again after a crash
    OnCrash,
}

impl From<RestartPolicyArg> for types::RestartPolicy {
    fn from(p: RestartPolicyArg) -> Self {
        match p {
            RestartPolicyArg::Never => types::RestartPolicy::Never,
            RestartPolicyArg::OnCrash => types::RestartPolicy::OnCrash,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM
    Create {
        name: String,
        #[arg(long)]
        flavor: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        project: Option<String>,
        /// Create it stopped
        #[arg(long)]
        no_start: bool,
        /// Create this many, named NAME-1 … NAME-N, placed in one pass (all
        /// or none)
        #[arg(long)]
        count: Option<u32>,
        /// Only say where it would go (and why not elsewhere); create nothing
        #[arg(long)]
        dry_run: bool,
        /// Only hosts in this zone
        #[arg(long)]
        zone: Option<String>,
        /// Only hosts in this cluster
        #[arg(long)]
        cluster: Option<String>,
        /// Only hosts with this tag (repeatable)
        #[arg(long = "require-tag", value_name = "TAG")]
        require_tags: Vec<String>,
        /// Only hosts without this tag (repeatable)
        #[arg(long = "forbid-tag", value_name = "TAG")]
        forbid_tags: Vec<String>,
        /// Server group to join (its affinity policy applies)
        #[arg(long)]
        group: Option<String>,
        /// What happens when the VM goes down by itself: never (it stays
        /// crashed) or on-crash (the controller starts it again, at most 3
        /// times within 10 minutes)
        #[arg(long, value_enum, default_value_t = RestartPolicyArg::Never)]
        restart_policy: RestartPolicyArg,
        /// Storage pool for the disk: a shared pool (only hosts that see it
        /// are chosen) or local, the host's own data directory
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Change a VM's settings (its restart policy)
    Update {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        /// never or on-crash; setting it also re-arms automatic restarts
        /// that were given up
        #[arg(long, value_enum)]
        restart_policy: Option<RestartPolicyArg>,
    },
    /// List VMs
    List {
        #[arg(long)]
        project: Option<String>,
        /// Only VMs in this state
        #[arg(long)]
        state: Option<String>,
        /// Only VMs on this host (admin)
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a VM
    Show {
        vm: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// Start a VM
    Start {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Move a VM to another host: live while it runs, cold when stopped
    Migrate(crate::migrate::MigrateArgs),
    /// Stop a VM
    Stop {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Reboot a VM
    Reboot {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Delete a VM
    Delete {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        #[command(flatten)]
        wait: WaitOpt,
    },
    /// Print a VM's serial console
    Console {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        /// Keep printing new output until interrupted
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in a VM through its guest agent; exits with its exit code
    Exec {
        vm: String,
        #[arg(long)]
        project: Option<String>,
        /// Seconds to wait for the command
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        /// The command and its arguments (after --)
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs
    List {
        #[arg(long)]
        project: Option<String>,
        /// queued, running, cancelling, succeeded, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        /// e.g. vm_create
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        page: ListOpts,
    },
    /// Show a job and its step log
    Show { id: String },
    /// Wait for a job to end, with a progress bar
    Wait { id: String },
    /// Cancel a job
    Cancel {
        id: String,
        #[command(flatten)]
        wait: WaitOpt,
    },
}

/// Builds the API client from flags, environment and config file.
pub fn client(g: &GlobalOpts) -> Result<Client, CliError> {
    let cfg_path = g.config.clone().or_else(config::default_path);
    let cfg = match &cfg_path {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let url = g
        .url
        .clone()
        .or(cfg.url.clone())
        .unwrap_or_else(|| config::DEFAULT_URL.to_string());
    let token = match &g.token {
        Some(t) => Some(t.clone()),
        None => cfg.token()?,
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim())).map_err(
            |_| CliError::Usage("the token contains characters not allowed in a header".into()),
        )?;
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| CliError::Other(anyhow::anyhow!("building the HTTP client: {e}")))?;
    Ok(Client::new_with_client(url.trim_end_matches('/'), http))
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> Result<T, CliError> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|_| CliError::Usage(format!("{v:?} is not a valid {what}")))
}

pub(crate) fn name(v: &str) -> Result<types::Name, CliError> {
    v.parse()
        .map_err(|e| CliError::Usage(format!("invalid name {v:?}: {e}")))
}

/// Several names (tags), each checked like [`name`].
fn names(v: &[String]) -> Result<Vec<types::Name>, CliError> {
    v.iter().map(|t| name(t)).collect()
}

/// Runs one client command.
pub async fn run(cmd: ClientCommand, g: GlobalOpts) -> Result<(), CliError> {
    let c = client(&g)?;
    let f = g.output;
    let interactive = f == Format::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cmd {
        ClientCommand::Whoami => {
            let w = c.whoami().send().await?.into_inner();
            output::print(f, &w, |w| {
                fields(vec![
                    ("token", w.token.name.clone()),
                    ("id", w.token.id.to_string()),
                    ("role", wire(&w.token.role)),
                    (
                        "project",
                        w.project
                            .as_ref()
                            .map(|p| p.name.clone())
                            .unwrap_or_else(|| "-".into()),
                    ),
                ])
            });
        }
        ClientCommand::Project(p) => project(&c, f, p).await?,
        ClientCommand::Token(t) => token(&c, f, t).await?,
        ClientCommand::Host(h) => host(&c, f, h, interactive).await?,
        ClientCommand::Image(i) => image(&c, f, i).await?,
        ClientCommand::Flavor(fl) => flavor(&c, f, fl).await?,
        ClientCommand::Vm(v) => vm(&c, f, v, interactive).await?,
        ClientCommand::Cluster(cl) => crate::scheduling::cluster(&c, f, cl).await?,
        ClientCommand::ServerGroup(g) => crate::scheduling::server_group(&c, f, g).await?,
        ClientCommand::Job(j) => job(&c, f, j, interactive).await?,
        ClientCommand::Backup(b) => crate::backups::backup(&c, f, b, interactive).await?,
        ClientCommand::Snapshot(s) => crate::snapshots::snapshot(&c, f, s, interactive).await?,
        ClientCommand::Volume(v) => crate::volumes::volume(&c, f, v, interactive).await?,
        ClientCommand::Pool(p) => crate::pools::pool(&c, f, p).await?,
    }
    Ok(())
}

/// Fetches one page or, with `--all`, every page.
pub(crate) async fn pages<T, F, Fut>(
    opts: &ListOpts,
    mut fetch: F,
) -> Result<(Vec<T>, Option<String>), CliError>
where
    F: FnMut(u32, Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), CliError>>,
{
    let mut items = Vec::new();
    let mut cursor = opts.cursor.clone();
    loop {
        let (mut got, next) = fetch(opts.limit, cursor.clone()).await?;
        items.append(&mut got);
        if !opts.all || next.is_none() {
            return Ok((items, next));
        }
        cursor = next;
    }
}

pub(crate) fn print_list<T: serde::Serialize>(
    f: Format,
    items: Vec<T>,
    next: Option<String>,
    table: impl FnOnce(&Vec<T>) -> Table,
) {
    match f {
        Format::Json => {
            let v = serde_json::json!({ "items": items, "next_cursor": next });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Table => {
            print!("{}", table(&items).render());
            if let Some(n) = next {
                eprintln!("more: --cursor {n}");
            }
        }
    }
}

pub(crate) fn ts(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

async fn project(c: &Client, f: Format, cmd: ProjectCmd) -> Result<(), CliError> {
    let one = |p: &types::Project| {
        fields(vec![
            ("name", p.name.clone()),
            ("id", p.id.to_string()),
            ("description", p.description.clone()),
            ("created", ts(&p.created_at)),
        ])
    };
    match cmd {
        ProjectCmd::Create {
            name: n,
            description,
        } => {
            let body = types::ProjectCreate {
                name: name(&n)?,
                description: Some(description),
            };
            let p = c.project_create().body(body).send().await?.into_inner();
            output::print(f, &p, one);
        }
        ProjectCmd::List { name, page } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let name = name.clone();
                async move {
                    let mut r = c.project_list().limit(limit);
                    if let Some(n) = name {
                        r = r.name(n);
                    }
                    if let Some(cu) = cursor {
                        r = r.cursor(cu);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["NAME", "ID", "CREATED"]);
                for p in items {
                    t.row(vec![p.name.clone(), p.id.to_string(), ts(&p.created_at)]);
                }
                t
            });
        }
        ProjectCmd::Show { project } => {
            let p = c.project_view().project(project).send().await?.into_inner();
            output::print(f, &p, one);
        }
        ProjectCmd::Delete { project } => {
            c.project_delete().project(project.clone()).send().await?;
            if f == Format::Table {
                println!("deleted project {project}");
            }
        }
    }
    Ok(())
}

fn token_fields(t: &types::Token) -> Vec<(&'static str, String)> {
    vec![
        ("name", t.name.clone()),
        ("id", t.id.to_string()),
        ("role", wire(&t.role)),
        ("project", opt(&t.project_id)),
        ("prefix", t.prefix.clone()),
        ("created", ts(&t.created_at)),
        (
            "expires",
            t.expires_at
                .as_ref()
                .map(ts)
                .unwrap_or_else(|| "never".into()),
        ),
        (
            "revoked",
            t.revoked_at.as_ref().map(ts).unwrap_or_else(|| "-".into()),
        ),
        (
            "last used",
            t.last_used_at
                .as_ref()
                .map(ts)
                .unwrap_or_else(|| "-".into()),
        ),
    ]
}

async fn token(c: &Client, f: Format, cmd: TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            name: n,
            role,
            project,
            expires_in_days,
        } => {
            let body = types::TokenCreate {
                name: name(&n)?,
                role: parse_enum("role (admin, member or reader)", &role)?,
                project,
                expires_in_days,
            };
            let t = c.token_create().body(body).send().await?.into_inner();
            output::print(f, &t, |t| {
                let mut v = token_fields(&t.token);
                v.push(("secret", t.secret.clone()));
                fields(v)
            });
            if f == Format::Table {
                eprintln!("The secret is shown once; store it now.");
            }
        }
        TokenCmd::List {
            project,
            revoked,
            page,
        } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let project = project.clone();
                async move {
                    let mut r = c.token_list().limit(limit).include_revoked(revoked);
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
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["NAME", "ID", "ROLE", "PROJECT", "PREFIX", "REVOKED"]);
                for k in items {
                    t.row(vec![
                        k.name.clone(),
                        k.id.to_string(),
                        wire(&k.role),
                        opt(&k.project_id),
                        k.prefix.clone(),
                        if k.revoked_at.is_some() {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                    ]);
                }
                t
            });
        }
        TokenCmd::Show { id } => {
            let t = c.token_view().token(id).send().await?.into_inner();
            output::print(f, &t, |t| fields(token_fields(t)));
        }
        TokenCmd::Revoke { id } => {
            let t = c.token_revoke().token(id).send().await?.into_inner();
            output::print(f, &t, |t| fields(token_fields(t)));
        }
    }
    Ok(())
}

async fn host(c: &Client, f: Format, cmd: HostCmd, interactive: bool) -> Result<(), CliError> {
    match cmd {
        HostCmd::List {
            zone,
            cluster,
            page,
        } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let (zone, cluster) = (zone.clone(), cluster.clone());
                async move {
                    let mut r = c.host_list().limit(limit);
                    if let Some(z) = zone {
                        r = r.zone(z);
                    }
                    if let Some(cl) = cluster {
                        r = r.cluster(cl);
                    }
                    if let Some(cu) = cursor {
                        r = r.cursor(cu);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t = Table::new(&[
                    "NAME",
                    "STATE",
                    "ZONE",
                    "CLUSTER",
                    "CPUS",
                    "MEMORY",
                    "ACCEL",
                    "LAST HEARTBEAT",
                ]);
                for h in items {
                    t.row(vec![
                        h.name.clone(),
                        wire(&h.state),
                        h.zone.clone(),
                        h.cluster.clone(),
                        h.cpus.to_string(),
                        bytes(h.memory_bytes),
                        opt(&h.accel),
                        h.last_heartbeat_at
                            .as_ref()
                            .map(ts)
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                t
            });
        }
        HostCmd::Maintenance { host, mode, wait } => {
            crate::migrate::host_maintenance(c, f, host, mode, wait, interactive).await?
        }
        HostCmd::Update {
            host,
            add_tags,
            remove_tags,
        } => {
            let body = types::HostUpdate {
                add_tags: names(&add_tags)?,
                remove_tags: names(&remove_tags)?,
            };
            let h = c
                .host_update()
                .host(host)
                .body(body)
                .send()
                .await?
                .into_inner();
            output::print(f, &h, host_fields);
        }
        HostCmd::Show { host } => {
            let h = c.host_view().host(host).send().await?.into_inner();
            output::print(f, &h, host_fields);
        }
        HostCmd::EnrollToken {
            expires_in_hours,
            uses,
        } => {
            let body = types::EnrollmentTokenCreate {
                expires_in_hours: Some(expires_in_hours),
                uses: Some(uses),
            };
            let t = c
                .enrollment_token_create()
                .body(body)
                .send()
                .await?
                .into_inner();
            match f {
                Format::Json => output::print(f, &t, |_| Table::new(&[])),
                Format::Table => {
                    println!("{}", t.token);
                    eprintln!(
                        "Token for {} host(s), valid until {}. On the new host run:\n  stratus agent --url URL --enroll-token {} --data-dir DIR",
                        t.uses,
                        ts(&t.expires_at),
                        t.token
                    );
                }
            }
        }
    }
    Ok(())
}

fn image_fields(i: &types::Image) -> Table {
    fields(vec![
        ("name", i.name.clone()),
        ("id", i.id.to_string()),
        ("project", i.project_id.to_string()),
        ("state", wire(&i.state)),
        ("visibility", wire(&i.visibility)),
        (
            "format",
            i.format.as_ref().map(wire).unwrap_or_else(|| "-".into()),
        ),
        (
            "virtual size",
            i.virtual_size.map(bytes).unwrap_or_else(|| "-".into()),
        ),
        (
            "file size",
            i.file_size.map(bytes).unwrap_or_else(|| "-".into()),
        ),
        ("sha256", opt(&i.sha256)),
        ("created", ts(&i.created_at)),
    ])
}

async fn image(c: &Client, f: Format, cmd: ImageCmd) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Register {
            name: n,
            file,
            path,
            project,
            public,
            format,
            kernel_path,
            initrd_path,
            cmdline,
        } => {
            let format: Option<types::ImageFormat> = match format {
                Some(s) => Some(parse_enum("format (qcow2 or raw)", &s)?),
                None => None,
            };
            let body = types::ImageCreate {
                name: name(&n)?,
                project: project.clone(),
                visibility: Some(if public {
                    types::ImageVisibility::Public
                } else {
                    types::ImageVisibility::Private
                }),
                path,
                format,
                kernel_path,
                initrd_path,
                cmdline,
            };
            let img = c.image_create().body(body).send().await?.into_inner();
            let img = match file {
                None => img,
                Some(file) => {
                    let fh = tokio::fs::File::open(&file).await.map_err(|e| {
                        CliError::Usage(format!("cannot open {}: {e}", file.display()))
                    })?;
                    let stream = tokio_util::io::ReaderStream::with_capacity(fh, 1 << 20);
                    let uploaded = c
                        .image_upload()
                        .image(img.id.to_string())
                        .body(reqwest::Body::wrap_stream(stream))
                        .send()
                        .await;
                    match uploaded {
                        Ok(r) => r.into_inner(),
                        Err(e) => {
                            // Leave nothing half-registered behind.
                            let _ = c.image_delete().image(img.id.to_string()).send().await;
                            return Err(e.into());
                        }
                    }
                }
            };
            output::print(f, &img, image_fields);
        }
        ImageCmd::List { project, page } => {
            let (items, next) = pages(&page, |limit, cursor| {
                let project = project.clone();
                async move {
                    let mut r = c.image_list().limit(limit);
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
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["NAME", "ID", "STATE", "FORMAT", "SIZE", "VISIBILITY"]);
                for i in items {
                    t.row(vec![
                        i.name.clone(),
                        i.id.to_string(),
                        wire(&i.state),
                        i.format.as_ref().map(wire).unwrap_or_else(|| "-".into()),
                        i.virtual_size.map(bytes).unwrap_or_else(|| "-".into()),
                        wire(&i.visibility),
                    ]);
                }
                t
            });
        }
        ImageCmd::Show { image, project } => {
            let mut r = c.image_view().image(image);
            if let Some(p) = project {
                r = r.project(p);
            }
            let i = r.send().await?.into_inner();
            output::print(f, &i, image_fields);
        }
        ImageCmd::Delete { image, project } => {
            let mut r = c.image_delete().image(image.clone());
            if let Some(p) = project {
                r = r.project(p);
            }
            r.send().await?;
            if f == Format::Table {
                println!("deleted image {image}");
            }
        }
    }
    Ok(())
}

async fn flavor(c: &Client, f: Format, cmd: FlavorCmd) -> Result<(), CliError> {
    let one = |fl: &types::Flavor| {
        fields(vec![
            ("name", fl.name.clone()),
            ("id", fl.id.to_string()),
            ("vcpus", fl.vcpus.to_string()),
            ("memory", bytes(fl.memory_bytes)),
            ("disk", bytes(fl.disk_bytes)),
        ])
    };
    match cmd {
        FlavorCmd::Create {
            name: n,
            vcpus,
            memory,
            disk,
        } => {
            let body = types::FlavorCreate {
                name: name(&n)?,
                vcpus,
                memory_bytes: memory.bytes(),
                disk_bytes: disk.bytes(),
            };
            let fl = c.flavor_create().body(body).send().await?.into_inner();
            output::print(f, &fl, one);
        }
        FlavorCmd::List { page } => {
            let (items, next) = pages(&page, |limit, cursor| async move {
                let mut r = c.flavor_list().limit(limit);
                if let Some(cu) = cursor {
                    r = r.cursor(cu);
                }
                let p = r.send().await?.into_inner();
                Ok((p.items, p.next_cursor))
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["NAME", "VCPUS", "MEMORY", "DISK", "ID"]);
                for fl in items {
                    t.row(vec![
                        fl.name.clone(),
                        fl.vcpus.to_string(),
                        bytes(fl.memory_bytes),
                        bytes(fl.disk_bytes),
                        fl.id.to_string(),
                    ]);
                }
                t
            });
        }
        FlavorCmd::Show { flavor } => {
            let fl = c.flavor_view().flavor(flavor).send().await?.into_inner();
            output::print(f, &fl, one);
        }
        FlavorCmd::Delete { flavor } => {
            c.flavor_delete().flavor(flavor.clone()).send().await?;
            if f == Format::Table {
                println!("deleted flavor {flavor}");
            }
        }
    }
    Ok(())
}

fn vm_fields(v: &types::Vm) -> Table {
    let guest = match &v.guest {
        Some(g) if g.connected => "connected".to_string(),
        Some(_) => "not connected".to_string(),
        None => "-".to_string(),
    };
    let os = match v.guest.as_ref().map(|g| (&g.os_name, &g.os_version)) {
        Some((Some(n), Some(ver))) => format!("{n} {ver}"),
        Some((Some(n), None)) => n.clone(),
        _ => "-".into(),
    };
    let ips = v
        .guest
        .as_ref()
        .filter(|g| !g.ip_addresses.is_empty())
        .map(|g| g.ip_addresses.join(", "))
        .unwrap_or_else(|| "-".into());
    let contact = v
        .guest
        .as_ref()
        .and_then(|g| g.last_contact.as_ref())
        .map(ts)
        .unwrap_or_else(|| "-".into());
    let mut t = fields(vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        ("project", v.project_id.to_string()),
        ("state", wire(&v.state)),
        ("desired", wire(&v.desired_state)),
        ("reason", opt(&v.state_reason)),
        ("restart policy", wire(&v.restart_policy)),
        ("host", opt(&v.host_id)),
        ("vcpus", v.vcpus.to_string()),
        ("memory", bytes(v.memory_bytes)),
        ("disk", bytes(v.disk_bytes)),
        ("flavor", v.flavor_id.to_string()),
        ("image", v.image_id.to_string()),
        ("created", ts(&v.created_at)),
        ("guest agent", guest),
        ("guest os", os),
        ("guest ips", ips),
        ("last contact", contact),
    ]);
    t.row(vec![
        "observed".into(),
        v.observed_at.as_ref().map(ts).unwrap_or_else(|| "-".into()),
    ]);
    t
}

/// Prints an accepted VM operation, or waits for it and prints the result.
pub(crate) async fn vm_operation(
    c: &Client,
    f: Format,
    op: types::VmOperation,
    wait: WaitOpt,
    interactive: bool,
    deleting: bool,
) -> Result<(), CliError> {
    if !wait.wait {
        output::print(f, &op, |op| {
            let mut t = vm_fields(&op.vm);
            t.row(vec!["job".into(), op.job.id.to_string()]);
            t
        });
        return Ok(());
    }
    let job = wait_for_job(c, &op.job.id.to_string(), interactive).await?;
    if deleting {
        output::print(f, &job, |j| {
            fields(vec![
                ("deleted", op.vm.name.clone()),
                ("job", j.id.to_string()),
            ])
        });
        return Ok(());
    }
    let vm = c
        .vm_view()
        .vm(op.vm.id.to_string())
        .send()
        .await?
        .into_inner();
    output::print(f, &vm, vm_fields);
    Ok(())
}

/// Prints a batch create; with `--wait`, waits for every job first.
fn host_fields(h: &types::Host) -> Table {
    let mut t = fields(vec![
        ("name", h.name.clone()),
        ("id", h.id.to_string()),
        ("state", wire(&h.state)),
        ("zone", h.zone.clone()),
        ("cluster", h.cluster.clone()),
        ("address", h.address.clone()),
        ("cpus", h.cpus.to_string()),
        ("memory", bytes(h.memory_bytes)),
        ("disk", bytes(h.disk_bytes)),
        ("qemu", opt(&h.qemu_version)),
        ("accel", opt(&h.accel)),
        (
            "migration",
            if h.migration_tls { "tls" } else { "plain" }.into(),
        ),
        (
            "tags",
            if h.tags.is_empty() {
                "-".into()
            } else {
                h.tags.join(",")
            },
        ),
        (
            "allocated",
            format!(
                "{} vCPUs, {} memory, {} disk",
                h.allocated.vcpus,
                bytes(h.allocated.memory_bytes),
                bytes(h.allocated.disk_bytes)
            ),
        ),
        (
            "last heartbeat",
            h.last_heartbeat_at
                .as_ref()
                .map(ts)
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
    // VMs the host has without the controller's say, one row each.
    if h.orphans.is_empty() {
        t.row(vec!["orphans".into(), "-".into()]);
    }
    for o in &h.orphans {
        t.row(vec![
            "orphan".into(),
            format!(
                "{} {} (first seen {}, last {})",
                o.vm_id,
                wire(&o.action),
                ts(&o.first_seen_at),
                ts(&o.last_seen_at)
            ),
        ]);
    }
    t
}

async fn vm_batch(
    c: &Client,
    f: Format,
    b: types::VmBatch,
    wait: WaitOpt,
    interactive: bool,
) -> Result<(), CliError> {
    if wait.wait {
        for op in &b.items {
            wait_for_job(c, &op.job.id.to_string(), interactive).await?;
        }
    }
    let mut vms = Vec::with_capacity(b.items.len());
    for op in &b.items {
        vms.push(if wait.wait {
            c.vm_view()
                .vm(op.vm.id.to_string())
                .send()
                .await?
                .into_inner()
        } else {
            op.vm.clone()
        });
    }
    output::print(f, &vms, |vms| {
        let mut t = Table::new(&["NAME", "STATE", "HOST", "ID"]);
        for v in vms {
            t.row(vec![
                v.name.clone(),
                wire(&v.state),
                opt(&v.host_id),
                v.id.to_string(),
            ]);
        }
        t
    });
    Ok(())
}

async fn vm(c: &Client, f: Format, cmd: VmCmd, interactive: bool) -> Result<(), CliError> {
    match cmd {
        VmCmd::Create {
            name: n,
            flavor,
            image,
            project,
            no_start,
            count,
            dry_run,
            zone,
            cluster,
            require_tags,
            forbid_tags,
            group,
            restart_policy,
            pool,
            wait,
        } => {
            let body = types::VmCreate {
                name: name(&n)?,
                flavor,
                image,
                project,
                start: Some(!no_start),
                zone,
                cluster,
                require_tags: names(&require_tags)?,
                forbid_tags: names(&forbid_tags)?,
                group,
                restart_policy: Some(restart_policy.into()),
                pool,
            };
            if dry_run {
                let batch = types::VmBatchCreate {
                    count: count.unwrap_or(1),
                    vm: body,
                };
                let p = c
                    .vm_placement_preview()
                    .body(batch)
                    .send()
                    .await?
                    .into_inner();
                crate::scheduling::print_preview(f, &p);
                if !p.fits {
                    return Err(CliError::Exit(1));
                }
            } else if let Some(count) = count {
                let batch = types::VmBatchCreate { count, vm: body };
                let b = c.vm_batch_create().body(batch).send().await?.into_inner();
                vm_batch(c, f, b, wait, interactive).await?;
            } else {
                let op = c.vm_create().body(body).send().await?.into_inner();
                vm_operation(c, f, op, wait, interactive, false).await?;
            }
        }
        VmCmd::List {
            project,
            state,
            host,
            page,
        } => {
            let state: Option<types::VmState> = match state {
                Some(s) => Some(parse_enum("VM state", &s)?),
                None => None,
            };
            let (items, next) = pages(&page, |limit, cursor| {
                let (project, host) = (project.clone(), host.clone());
                async move {
                    let mut r = c.vm_list().limit(limit);
                    if let Some(p) = project {
                        r = r.project(p);
                    }
                    if let Some(s) = state {
                        r = r.state(s);
                    }
                    if let Some(h) = host {
                        r = r.host(h);
                    }
                    if let Some(cu) = cursor {
                        r = r.cursor(cu);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["NAME", "STATE", "VCPUS", "MEMORY", "HOST", "ID"]);
                for v in items {
                    t.row(vec![
                        v.name.clone(),
                        wire(&v.state),
                        v.vcpus.to_string(),
                        bytes(v.memory_bytes),
                        opt(&v.host_id),
                        v.id.to_string(),
                    ]);
                }
                t
            });
        }
        VmCmd::Show { vm, project } => {
            let mut r = c.vm_view().vm(vm);
            if let Some(p) = project {
                r = r.project(p);
            }
            let v = r.send().await?.into_inner();
            output::print(f, &v, vm_fields);
        }
        VmCmd::Update {
            vm,
            project,
            restart_policy,
        } => {
            let body = types::VmUpdate {
                restart_policy: restart_policy.map(Into::into),
            };
            let mut r = c.vm_update().vm(vm).body(body);
            if let Some(p) = project {
                r = r.project(p);
            }
            let v = r.send().await?.into_inner();
            output::print(f, &v, vm_fields);
        }
        VmCmd::Start { vm, project, wait } => {
            let mut r = c.vm_start().vm(vm);
            if let Some(p) = project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            vm_operation(c, f, op, wait, interactive, false).await?;
        }
        VmCmd::Migrate(a) => crate::migrate::vm_migrate(c, f, a, interactive).await?,
        VmCmd::Stop { vm, project, wait } => {
            let mut r = c.vm_stop().vm(vm);
            if let Some(p) = project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            vm_operation(c, f, op, wait, interactive, false).await?;
        }
        VmCmd::Reboot { vm, project, wait } => {
            let mut r = c.vm_reboot().vm(vm);
            if let Some(p) = project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            vm_operation(c, f, op, wait, interactive, false).await?;
        }
        VmCmd::Delete { vm, project, wait } => {
            let mut r = c.vm_delete().vm(vm);
            if let Some(p) = project {
                r = r.project(p);
            }
            let op = r.send().await?.into_inner();
            vm_operation(c, f, op, wait, interactive, true).await?;
        }
        VmCmd::Console {
            vm,
            project,
            follow,
        } => console(c, &vm, project, follow).await?,
        VmCmd::Exec {
            vm,
            project,
            timeout,
            command,
        } => {
            let body = types::VmExec {
                argv: command,
                timeout_secs: Some(timeout),
            };
            let mut r = c.vm_exec().vm(vm).body(body);
            if let Some(p) = project {
                r = r.project(p);
            }
            let res = r.send().await?.into_inner();
            let out = decode(&res.stdout_base64)?;
            let err = decode(&res.stderr_base64)?;
            if f == Format::Json {
                output::print(f, &res, |_| Table::new(&[]));
            } else {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&out);
                let _ = std::io::stderr().write_all(&err);
            }
            if res.exit_code != 0 {
                return Err(CliError::Exit(res.exit_code));
            }
        }
    }
    Ok(())
}

fn decode(b64: &str) -> Result<Vec<u8>, CliError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| CliError::Other(anyhow::anyhow!("the server sent invalid base64: {e}")))
}

/// Prints the console; with `follow`, keeps polling for new output.
async fn console(
    c: &Client,
    vm: &str,
    project: Option<String>,
    follow: bool,
) -> Result<(), CliError> {
    use std::io::Write;
    let mut offset: Option<u64> = None;
    loop {
        let mut r = c.vm_console().vm(vm.to_string()).max(1u32 << 20);
        if let Some(p) = &project {
            r = r.project(p.clone());
        }
        if let Some(o) = offset {
            r = r.offset(o);
        }
        let chunk = r.send().await?.into_inner();
        if chunk.truncated_before && offset.is_some() {
            eprintln!("[... console output dropped ...]");
        }
        let data = decode(&chunk.data_base64)?;
        let mut out = std::io::stdout();
        let _ = out.write_all(&data);
        let _ = out.flush();
        offset = Some(chunk.next_offset);
        if !follow {
            return Ok(());
        }
        if data.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

fn job_table(j: &types::Job) -> Table {
    let mut t = fields(vec![
        ("id", j.id.to_string()),
        ("kind", j.kind.clone()),
        ("target", format!("{} {}", j.target_kind, j.target_id)),
        ("state", wire(&j.state)),
        ("progress", format!("{}%", j.progress)),
        ("step", opt(&j.current_step)),
        (
            "error",
            j.error
                .as_ref()
                .map(|e| format!("{} ({})", e.message, e.code))
                .unwrap_or_else(|| "-".into()),
        ),
        ("created", ts(&j.created_at)),
        (
            "finished",
            j.finished_at.as_ref().map(ts).unwrap_or_else(|| "-".into()),
        ),
    ]);
    for e in &j.events {
        t.row(vec![
            format!("  {}", ts(&e.at)),
            format!("{}: {}", e.step, e.message),
        ]);
    }
    t
}

async fn job(c: &Client, f: Format, cmd: JobCmd, interactive: bool) -> Result<(), CliError> {
    match cmd {
        JobCmd::List {
            project,
            state,
            kind,
            page,
        } => {
            let state: Option<types::JobState> = match state {
                Some(s) => Some(parse_enum("job state", &s)?),
                None => None,
            };
            let (items, next) = pages(&page, |limit, cursor| {
                let (project, kind) = (project.clone(), kind.clone());
                async move {
                    let mut r = c.job_list().limit(limit);
                    if let Some(p) = project {
                        r = r.project(p);
                    }
                    if let Some(s) = state {
                        r = r.state(s);
                    }
                    if let Some(k) = kind {
                        r = r.kind(k);
                    }
                    if let Some(cu) = cursor {
                        r = r.cursor(cu);
                    }
                    let p = r.send().await?.into_inner();
                    Ok((p.items, p.next_cursor))
                }
            })
            .await?;
            print_list(f, items, next, |items| {
                let mut t = Table::new(&["ID", "KIND", "STATE", "PROGRESS", "STEP", "CREATED"]);
                for j in items {
                    t.row(vec![
                        j.id.to_string(),
                        j.kind.clone(),
                        wire(&j.state),
                        format!("{}%", j.progress),
                        opt(&j.current_step),
                        ts(&j.created_at),
                    ]);
                }
                t
            });
        }
        JobCmd::Show { id } => {
            let j = c.job_view().job(id).send().await?.into_inner();
            output::print(f, &j, job_table);
        }
        JobCmd::Wait { id } => {
            let result = wait_for_job(c, &id, interactive).await;
            let j = c.job_view().job(id).send().await?.into_inner();
            output::print(f, &j, job_table);
            result?;
        }
        JobCmd::Cancel { id, wait } => {
            let j = c.job_cancel().job(id.clone()).send().await?.into_inner();
            if wait.wait {
                // A cancelled job "fails" to succeed; that is the point here.
                let _ = wait_for_job(c, &id, interactive).await;
                let j = c.job_view().job(id).send().await?.into_inner();
                output::print(f, &j, job_table);
            } else {
                output::print(f, &j, job_table);
            }
        }
    }
    Ok(())
}
