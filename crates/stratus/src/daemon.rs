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
    /// This controller's name in job claims [default: HOSTNAME-PID]
    #[arg(long)]
    controller_id: Option<String>,
    /// Log as JSON lines instead of text
    #[arg(long)]
    log_json: bool,
}

fn init_logging(json: bool) {
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

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

pub async fn up(args: UpArgs, global: GlobalOpts) -> anyhow::Result<()> {
    init_logging(args.log_json);
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
    println!("Try: stratus whoami; stratus flavor list; stratus vm list");
    println!("Stop with Ctrl-C.");

    let why = shutdown_signal().await?;
    tracing::info!(signal = why, "shutting down");
    server.shutdown().await;
    println!("Stratus stopped.");
    Ok(())
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
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
    let why = shutdown_signal().await?;
    tracing::info!(signal = why, "shutting down");
    server.shutdown().await;
    Ok(())
}
