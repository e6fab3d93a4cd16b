//! `stratus`: the one binary.
//!
//! - `stratus up`: the all-in-one cloud (controller on SQLite in a data dir).
//! - `stratus server`: a controller (SQLite or PostgreSQL).
//! - `stratus project|token|host|image|flavor|vm|job|whoami`: the CLI, over
//!   the API (see `stratus-cli`).

mod agent_cmd;
mod bench;
mod bench_api;
mod bench_backup;
mod bench_chaos;
mod bench_migrate;
mod bench_support;
mod daemon;
mod demo;

use clap::{Parser, Subcommand};
use stratus_cli::{ClientCommand, GlobalOpts};

#[derive(Parser, Debug)]
#[command(
    name = "stratus",
    version,
    about = "Stratus private cloud: controller, all-in-one and CLI"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the all-in-one cloud: a controller on SQLite in DATA_DIR, in the
    /// foreground until SIGINT or SIGTERM
    Up(daemon::UpArgs),
    /// Run a controller
    Server(daemon::ServerArgs),
    /// Run the host agent: enroll this host with a controller (once), then
    /// run the VMs it is given, until SIGINT or SIGTERM (VMs keep running)
    Agent(agent_cmd::AgentArgs),
    /// Benchmarks (see BENCHMARKS.md)
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => report(daemon::up(args, cli.global).await),
            Command::Server(args) => report(daemon::server(args).await),
            Command::Agent(args) => report(agent_cmd::run(args, cli.global).await),
            Command::Bench(cmd) => report(bench::run(cmd).await),
            Command::Client(cmd) => match stratus_cli::run(cmd, cli.global).await {
                Ok(()) => 0,
                // `vm exec`: the guest command's own status, already visible
                // in its output; nothing to add.
                Err(stratus_cli::CliError::Exit(code)) => code,
                Err(e) => {
                    eprintln!("error: {e}");
                    e.exit_code()
                }
            },
        }
    });
    std::process::exit(code);
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
