//! The controller-kill chaos run, end to end and small: the real `stratus`
//! binary runs `stratus bench chaos`, which starts its own controllers
//! (child processes), a simulated fleet and clients, SIGKILLs controllers
//! while VM operations run, and checks the invariants at the end. These
//! tests hold it to zero anomalies on each backend.
//!
//! They are heavy (a dozen processes each, about 50 s): `.config/nextest.toml`
//! runs them one at a time, and under `cargo test` a lock does.
//!
//! Before the saga engine (issue 5), about one run in two found a real
//! anomaly: a job requeued after its owner died and then cancelled was
//! ended as if nothing had been done, though its host had already acted.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stratus");

/// One chaos run at a time in this process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `stratus bench chaos` with `args` (killed after `limit`); its
/// output and exit status.
fn chaos(args: &[&str], limit: Duration) -> (String, bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let home = tempfile::tempdir().expect("home");
    let mut child = Command::new(BIN)
        .args(["bench", "chaos"])
        .args(args)
        .env("HOME", home.path())
        .env("TMPDIR", home.path())
        .env_remove("STRATUS_URL")
        .env_remove("STRATUS_TOKEN")
        .env_remove("STRATUS_BENCH_PG_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stratus bench chaos");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            // SIGTERM, so it stops its own children on the way out.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(25));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let text = format!("{stdout}\n--- stderr ---\n{stderr}");
    println!("{text}");
    match status {
        Some(s) => (text, s.success()),
        None => panic!("the chaos run did not finish within {limit:?}:\n{text}"),
    }
}

/// The figures of the final `chaos:` line.
fn figures(text: &str) -> std::collections::HashMap<String, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("chaos: "))
        .unwrap_or_else(|| panic!("no final line:\n{text}"));
    line["chaos: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn number(f: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {f:?}"))
}

/// What every run must show: kills happened, jobs ran and ended, and
/// nothing is inconsistent.
fn assert_clean(text: &str, ok: bool, controllers: u64) {
    let f = figures(text);
    assert_eq!(number(&f, "controllers"), controllers, "{text}");
    assert!(number(&f, "kills") >= 4, "fewer than 4 kills:\n{text}");
    assert!(number(&f, "succeeded") > 0, "no job succeeded:\n{text}");
    assert_eq!(number(&f, "anomalies"), 0, "anomalies:\n{text}");
    assert!(ok, "the run failed:\n{text}");
}

/// Small: 150 operations at 10 a second from 6 clients on 4 hosts, a kill
/// every 1-2.5 s (at least 4).
const SMALL: [&str; 16] = [
    "--ops",
    "150",
    "--rate",
    "10",
    "--clients",
    "6",
    "--hosts",
    "4",
    "--min-kills",
    "4",
    "--kill-every-ms",
    "1000..2500",
    "--job-wait-secs",
    "2",
    "--settle-secs",
    "90",
];

#[test]
fn chaos_on_sqlite_leaves_nothing_inconsistent() {
    let (text, ok) = chaos(&SMALL, Duration::from_secs(240));
    assert!(text.contains("backend=sqlite"), "{text}");
    assert_clean(&text, ok, 1);
}

#[test]
fn chaos_on_postgres_with_three_controllers_leaves_nothing_inconsistent() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(stratus_test_utils::postgres_url());
    let mut args = vec!["--backend", "postgres", "--database-url", &db];
    args.extend(SMALL);
    args.extend(["--controllers", "3", "--seed", "2"]);
    let (text, ok) = chaos(&args, Duration::from_secs(240));
    assert_clean(&text, ok, 3);
}
