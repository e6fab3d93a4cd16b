//! Test support shared by every crate's tests.
//!
//! [`postgres_url`] gives each test its own fresh database on a real
//! PostgreSQL server:
//! - under `scripts/test.sh` (and CI) one server is started for the whole run
//!   and its admin URL passed in `STRATUS_TEST_PG_URL`;
//! - under a bare `cargo test`, the first test in a process starts a private
//!   server (initdb + postgres on a free loopback port in a temp dir) that a
//!   watchdog stops when the process exits.
//!
//! Tests never skip when PostgreSQL is missing: a missing server is a failed
//! set-up, reported with what to install.
//!
//! [`migration_tls_certificates`] makes the x509 files QEMU's migration TLS
//! reads, for the driver's and the whole stack's migration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::sync::OnceCell;

mod tls;
pub use tls::migration_tls_certificates;

/// Environment variable naming a running server's admin URL.
pub const PG_URL_ENV: &str = "STRATUS_TEST_PG_URL";

static SERVER_URL: OnceCell<String> = OnceCell::const_new();

/// A URL to a new, empty database for one test.
pub async fn postgres_url() -> String {
    let admin = SERVER_URL
        .get_or_init(|| async {
            match std::env::var(PG_URL_ENV) {
                Ok(url) if !url.is_empty() => url,
                _ => tokio::task::spawn_blocking(start_private_server)
                    .await
                    .expect("starting PostgreSQL panicked"),
            }
        })
        .await
        .clone();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL at {admin}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let _ = conn.close().await;
    replace_db_name(&admin, &name)
}

/// Live (not zombie) processes whose command line contains every one of
/// `needles`, sorted: how tests find a VM's QEMU (daemonized, so not their
/// child) and check that none is left behind or duplicated.
pub fn live_processes_matching(needles: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            !zombie && needles.iter().all(|n| cmdline.contains(n))
        })
        .collect();
    pids.sort();
    pids
}

/// A URL to a new SQLite database file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("stratus.db").display())
}

fn replace_db_name(url: &str, db: &str) -> String {
    // postgres://user@host:port/dbname[?params]
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The directory holding PostgreSQL's server binaries (Debian keeps them out
/// of PATH, under /usr/lib/postgresql/<version>/bin).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().expect("local addr").port()
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb
/// and postgres refuse to run as root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn start_private_server() -> String {
    let bin = postgres_bin_dir().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql; \
             run scripts/setup-host.sh (installs the `postgresql` package)"
        )
    });
    let dir = tempfile::Builder::new()
        .prefix("stratus-test-pg-")
        .tempdir()
        .expect("creating a temp dir for PostgreSQL")
        .keep();
    let data = dir.join("data");
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("running chown");
        assert!(st.success(), "chown of {} failed", dir.display());
    }
    let out = pg_command(&bin, "initdb")
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .output()
        .expect("running initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // The watchdog: postgres runs as a child of a shell that stops it (with
    // pg_ctl: runuser does not pass signals on) and removes its files once
    // this test process is gone.
    let parent = std::process::id();
    let postgres = bin.join("postgres");
    let runas = if is_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "{runas}{pg} -D {data} -p {port} -k {dir} -h 127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
         >{dir}/log 2>&1 & pg=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.5; done; \
         {runas}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; wait $pg; rm -rf {dir}",
        pg = postgres.display(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    // Not waited for on purpose: the watchdog outlives this call and ends
    // on its own when this process does.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // Accepting TCP is not yet accepting queries; give it a moment.
            std::thread::sleep(Duration::from_millis(200));
            return url;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    panic!("PostgreSQL did not start within 30 s; its log:\n{log}");
}

fn is_root() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe {
        libc::geteuid() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_names() {
        assert_eq!(
            replace_db_name("postgres://postgres@127.0.0.1:5432/postgres", "t_1"),
            "postgres://postgres@127.0.0.1:5432/t_1"
        );
        assert_eq!(
            replace_db_name("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(
            replace_db_name("postgres://u@h:1", "x"),
            "postgres://u@h:1/x"
        );
    }
}
