//! `stratus up` and `stratus server`: the long-running processes.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use stratus_cli::config::{self, ConfigFile};
use stratus_cli::GlobalOpts;
use stratus_controller::{Server, ServerConfig};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where everything lives: database, images, admin token [default: $XDG_DATA_HOME/stratus]
    #[arg(long, env = "STRATUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address the API listens on
    #[arg(long, default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// Log as JSON lines instead of text
    #[arg(long)]
    log_json: bool,
    /// Run no local agent (a controller only; hosts join with `stratus agent`)
    #[arg(long)]
    no_agent: bool,
    /// Do not create the demo project, image and VM on first start
    #[arg(long)]
    no_demo: bool,
    /// QEMU accelerator for the local agent: auto probes whether KVM works
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Database URL: sqlite:///path/stratus.db or postgres://user@host/db
    /// [default: SQLite in DATA_DIR]
    #[arg(long, env = "STRATUS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Where the image store lives
    #[arg(long, env = "STRATUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address the API listens on
    #[arg(long, default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// Where to write the first admin token, if this start creates one
    /// [default: DATA_DIR/admin.token]
    #[arg(long)]
    bootstrap_token_file: Option<PathBuf>,
    /// This controller's name in job leases; unique among live controllers
    /// [default: HOSTNAME-PID-RANDOM]
    #[arg(long)]
    controller_id: Option<String>,
    /// Log as JSON lines instead of text
    #[arg(long)]
    log_json: bool,
}

/// Every connected agent holds a connection (its long poll): a controller
/// of 10,000 hosts needs more open files than the usual soft limit of 1024.
fn raise_open_files() {
    match stratus_agent::raise_open_files_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Waits for SIGINT or SIGTERM (handlers are installed when this is called,
/// not when it is first polled).
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    dirs::data_dir()
        .map(|d| d.join("stratus"))
        .context("cannot tell the user's data directory; pass --data-dir")
}

fn default_controller_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "controller".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub async fn up(args: UpArgs, global: GlobalOpts) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let signal = shutdown_signal()?;
    raise_open_files();
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let token_file = data_dir.join("admin.token");
    let server = Server::start(ServerConfig {
        database_url: format!("sqlite://{}", data_dir.join("stratus.db").display()),
        listen: args.listen,
        data_dir: data_dir.clone(),
        bootstrap_token_file: Some(token_file.clone()),
        controller_id: default_controller_id(),
    })
    .await
    .context("starting the controller")?;
    let url = server.url();

    // Point the CLI at this cloud.
    let cfg_path = global.config.clone().or_else(config::default_path);
    if let Some(p) = &cfg_path {
        let cfg = ConfigFile {
            url: Some(url.clone()),
            token: None,
            token_file: Some(token_file.clone()),
        };
        if let Err(e) = cfg.save(p) {
            tracing::warn!(error = %e, "could not write the CLI config file");
        }
    }

    let admin = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .to_string();
    let agent = if args.no_agent {
        None
    } else {
        match start_local_agent(&url, &admin, &data_dir.join("agent"), args.accel).await {
            Ok(a) => Some(a),
            Err(e) => {
                server.shutdown().await;
                return Err(e.context("starting the local agent"));
            }
        }
    };

    println!("Stratus is up at {url}");
    println!("  data dir:    {}", data_dir.display());
    if server.bootstrap_token.is_some() {
        println!(
            "  admin token: {} (created now, mode 0600)",
            token_file.display()
        );
    } else {
        println!("  admin token: {}", token_file.display());
    }
    if let Some(p) = &cfg_path {
        println!(
            "  CLI config:  {} (the CLI uses this cloud and token by default)",
            p.display()
        );
    }
    match crate::demo::ensure_backup_target(&url, &admin, &data_dir.join("backups")).await {
        Ok(line) => println!("  {line}"),
        Err(e) => println!("  no backup target: {e:#}"),
    }
    if agent.is_some() && !args.no_demo {
        match crate::demo::default_guest_dir() {
            Some(dir) => match crate::demo::seed(&url, &admin, &dir).await {
                Ok(line) => println!("  {line}"),
                Err(e) => println!("  demo not created: {e:#}"),
            },
            None => println!("  no demo VM: cannot tell where the test guest would be"),
        }
    }
    println!("Try: stratus whoami; stratus host list; stratus vm list --project demo");
    println!("Stop with Ctrl-C.");

    let why = signal.await;
    tracing::info!(signal = why, "shutting down");
    if let Some(a) = agent {
        // The agent's loops stop; its VMs keep running and are re-adopted on
        // the next `stratus up`.
        a.shutdown().await;
    }
    server.shutdown().await;
    println!("Stratus stopped.");
    Ok(())
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let signal = shutdown_signal()?;
    raise_open_files();
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let database_url = args
        .database_url
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("stratus.db").display()));
    let token_file = args
        .bootstrap_token_file
        .unwrap_or_else(|| data_dir.join("admin.token"));
    let server = Server::start(ServerConfig {
        database_url,
        listen: args.listen,
        data_dir,
        bootstrap_token_file: Some(token_file.clone()),
        controller_id: args.controller_id.unwrap_or_else(default_controller_id),
    })
    .await
    .context("starting the controller")?;
    if server.bootstrap_token.is_some() {
        tracing::info!(path = %token_file.display(), "created the first admin token");
    }
    let why = signal.await;
    tracing::info!(signal = why, "shutting down");
    server.shutdown().await;
    Ok(())
}

/// Starts the all-in-one's own host agent (QEMU driver) in this process,
/// enrolling it on first start.
async fn start_local_agent(
    url: &str,
    admin_token: &str,
    dir: &std::path::Path,
    accel: AccelArg,
) -> anyhow::Result<stratus_agent::AgentHandle> {
    let enrolled = stratus_agent::Credentials::load(dir)?.is_some();
    let enroll_token = if enrolled {
        None
    } else {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {admin_token}").parse()?,
        );
        let c = stratus_client::Client::new_with_client(
            url,
            reqwest::Client::builder().default_headers(h).build()?,
        );
        let t = c
            .enrollment_token_create()
            .body(stratus_client::types::EnrollmentTokenCreate {
                expires_in_hours: Some(1),
                uses: None,
            })
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("creating an enrollment token: {e}"))?
            .into_inner();
        Some(t.token)
    };
    let accel = match accel {
        AccelArg::Auto => stratus_agent::AccelChoice::Auto,
        AccelArg::Kvm => stratus_agent::AccelChoice::Kvm,
        AccelArg::Tcg => stratus_agent::AccelChoice::Tcg,
    };
    let mut config = stratus_agent::AgentConfig::new(
        url,
        dir,
        stratus_agent::DriverConfig::Qemu {
            accel,
            qemu_binary: None,
            backup_bandwidth: None,
            migration: Default::default(),
        },
    );
    config.enroll_token = enroll_token;
    Ok(stratus_agent::Agent::start(config).await?)
}
