//! End to end: the real `stratus` binary. `stratus up` (or `stratus server`
//! on PostgreSQL) runs as a child process on a loopback port, and the CLI is
//! driven exactly as an operator would type it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_stratus");

/// A running `stratus up` or `stratus server`, killed if the test fails.
struct Running {
    child: Child,
    url: String,
    home: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_cmd(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env_remove("STRATUS_URL")
        .env_remove("STRATUS_TOKEN")
        .env_remove("STRATUS_CONFIG")
        .env_remove("STRATUS_DATA_DIR");
    c
}

fn start_up(home: &Path, data_dir: &Path) -> Running {
    let mut child = env_cmd(home)
        .args([
            "up",
            "--no-agent",
            "--no-demo",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stratus up");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut url = None;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(u) = line.strip_prefix("Stratus is up at ") {
                    url = Some(u.trim().to_string());
                }
                seen.push(line);
                if seen.last().is_some_and(|l| l.starts_with("Stop with")) {
                    break;
                }
            }
            _ => break,
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url =
        url.unwrap_or_else(|| panic!("stratus up did not report its URL; it printed: {seen:?}"));
    Running {
        child,
        url,
        home: home.to_path_buf(),
    }
}

impl Running {
    /// Runs a CLI command against this cloud with the config `up` wrote.
    fn cli(&self, args: &[&str]) -> Output {
        env_cmd(&self.home)
            .args(args)
            .output()
            .expect("run stratus")
    }

    fn cli_with_token(&self, token: &str, args: &[&str]) -> Output {
        env_cmd(&self.home)
            .env("STRATUS_TOKEN", token)
            .args(args)
            .output()
            .expect("run stratus")
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: Output, what: &str) -> Value {
    let s = ok(out, what);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {s}"))
}

/// A raw HTTP GET without credentials, over a plain socket.
fn http_get(url: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn the_spine_through_the_cli() {
    let home = tempfile::tempdir().expect("home");
    let data = home.path().join("cloud");
    let up = start_up(home.path(), &data);

    // First start: admin token written 0600, CLI config points here.
    let token_file = data.join("admin.token");
    let mode = std::fs::metadata(&token_file)
        .expect("admin.token")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let me = json(up.cli(&["whoami", "-o", "json"]), "whoami");
    assert_eq!(me["token"]["role"], "admin");

    // No token: 401 with the JSON error body.
    let (status, body) = http_get(&up.url, "/v1/vms");
    assert_eq!(status, 401);
    let err: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(err["error_code"], "unauthenticated");
    assert!(err["request_id"].is_string() && err["message"].is_string());
    assert_eq!(http_get(&up.url, "/healthz").0, 200);

    ok(
        up.cli(&["project", "create", "demo", "--description", "the demo"]),
        "project create",
    );
    let tok = json(
        up.cli(&[
            "token",
            "create",
            "dev",
            "--role",
            "member",
            "--project",
            "demo",
            "-o",
            "json",
        ]),
        "token create",
    );
    let member = tok["secret"].as_str().expect("secret").to_string();
    let flavor = json(
        up.cli(&[
            "flavor", "create", "tiny", "--vcpus", "1", "--memory", "128MiB", "--disk", "1GiB",
            "-o", "json",
        ]),
        "flavor create",
    );
    assert_eq!(flavor["memory_bytes"], 128u64 << 20);

    let img_file = home.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img_file)
        .arg("256M")
        .status()
        .expect("qemu-img (run scripts/setup-host.sh)");
    assert!(st.success());
    let img = json(
        up.cli_with_token(
            &member,
            &[
                "image",
                "register",
                "base",
                "--file",
                img_file.to_str().expect("utf8"),
                "-o",
                "json",
            ],
        ),
        "image register",
    );
    assert_eq!(img["state"], "ready");
    assert_eq!(img["format"], "qcow2");

    // With no host, a VM is refused at once, and the CLI says why.
    let refused = up.cli_with_token(
        &member,
        &["vm", "create", "web", "--flavor", "tiny", "--image", "base"],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("no_host_available") && stderr.contains("no host"),
        "{stderr}"
    );
    let dry = up.cli_with_token(
        &member,
        &[
            "vm",
            "create",
            "web",
            "--flavor",
            "tiny",
            "--image",
            "base",
            "--dry-run",
        ],
    );
    assert_eq!(dry.status.code(), Some(1), "a dry run that does not fit");
    assert!(String::from_utf8_lossy(&dry.stdout).contains("fits"));

    // A simulated host (the real agent binary, sim driver) joins.
    let enroll = json(
        up.cli(&["host", "enroll-token", "--uses", "1", "-o", "json"]),
        "enroll token",
    );
    let mut agent = env_cmd(home.path())
        .args([
            "agent",
            "--driver",
            "sim",
            "--name",
            "sim-1",
            "--url",
            &up.url,
            "--orphans",
            "keep",
        ])
        .args(["--enroll-token", enroll["token"].as_str().expect("token")])
        .arg("--data-dir")
        .arg(home.path().join("agent"))
        .env("STRATUS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stratus agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = json(up.cli(&["host", "list", "-o", "json"]), "host list");
        if hosts["items"][0]["state"] == "up" {
            break;
        }
        assert!(Instant::now() < deadline, "the sim host never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let dry = json(
        up.cli_with_token(
            &member,
            &[
                "vm",
                "create",
                "web",
                "--flavor",
                "tiny",
                "--image",
                "base",
                "--dry-run",
                "--count",
                "2",
                "-o",
                "json",
            ],
        ),
        "dry run",
    );
    assert_eq!(dry["fits"], true, "{dry}");
    assert_eq!(dry["placements"].as_array().map(|a| a.len()), Some(2));

    // A VM, as the member, by names.
    let op = json(
        up.cli_with_token(
            &member,
            &[
                "vm",
                "create",
                "web",
                "--flavor",
                "tiny",
                "--image",
                "base",
                "--restart-policy",
                "on-crash",
                "-o",
                "json",
            ],
        ),
        "vm create",
    );
    let vm_id = op["vm"]["id"].as_str().expect("id").to_string();
    assert_eq!(op["job"]["kind"], "vm_create");
    assert_eq!(op["vm"]["restart_policy"], "on_crash", "{op}");
    assert!(op["vm"]["host_id"].is_string(), "placed at creation: {op}");
    let list = json(
        up.cli_with_token(&member, &["vm", "list", "-o", "json"]),
        "vm list",
    );
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "web");
    let shown = json(
        up.cli_with_token(&member, &["vm", "show", "web", "-o", "json"]),
        "vm show",
    );
    assert_eq!(shown["id"], vm_id.as_str());
    let by_id = json(
        up.cli_with_token(&member, &["vm", "show", &vm_id, "-o", "json"]),
        "vm show by id",
    );
    assert_eq!(by_id["name"], "web");
    let updated = json(
        up.cli_with_token(
            &member,
            &[
                "vm",
                "update",
                "web",
                "--restart-policy",
                "never",
                "-o",
                "json",
            ],
        ),
        "vm update",
    );
    assert_eq!(updated["restart_policy"], "never", "{updated}");
    let table = ok(
        up.cli_with_token(&member, &["vm", "show", "web"]),
        "vm show",
    );
    assert!(
        table.contains("restart policy") && table.contains("never"),
        "{table}"
    );
    let host = ok(up.cli(&["host", "show", "sim-1"]), "host show");
    assert!(host.contains("orphans"), "{host}");
    // The job ends, the sim host having run the VM.
    let job = json(
        up.cli_with_token(
            &member,
            &[
                "job",
                "wait",
                op["job"]["id"].as_str().expect("job id"),
                "-o",
                "json",
            ],
        ),
        "job wait",
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    // Several at once, in one scheduling pass, in a server group.
    ok(
        up.cli_with_token(
            &member,
            &[
                "server-group",
                "create",
                "apart",
                "--policy",
                "soft-anti-affinity",
            ],
        ),
        "server-group create",
    );
    let many = json(
        up.cli_with_token(
            &member,
            &[
                "vm", "create", "many", "--flavor", "tiny", "--image", "base", "--count", "3",
                "--group", "apart", "--wait", "-o", "json",
            ],
        ),
        "vm create --count",
    );
    let names: Vec<&str> = many
        .as_array()
        .expect("VMs")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["many-1", "many-2", "many-3"]);
    assert!(
        many.as_array()
            .expect("VMs")
            .iter()
            .all(|v| v["state"] == "running"),
        "{many}"
    );
    let groups = ok(
        up.cli_with_token(&member, &["server-group", "list"]),
        "server-group list",
    );
    assert!(groups.contains("apart") && groups.contains("3"), "{groups}");
    let clusters = ok(up.cli(&["cluster", "list"]), "cluster list");
    assert!(
        clusters.contains("default") && clusters.contains("spread"),
        "{clusters}"
    );
    ok(
        up.cli(&[
            "cluster",
            "update",
            "default",
            "--cpu-ratio",
            "2",
            "--weigher",
            "pack",
        ]),
        "cluster update",
    );
    let host = json(
        up.cli(&["host", "update", "sim-1", "--add-tag", "ssd", "-o", "json"]),
        "host update",
    );
    assert_eq!(host["tags"][0], "ssd");
    assert_eq!(host["allocated"]["vcpus"], 4, "{host}");
    // Table output names things plainly.
    let table = ok(up.cli_with_token(&member, &["vm", "list"]), "vm list table");
    assert!(
        table.starts_with("NAME") && table.contains("web"),
        "{table}"
    );

    // Delete with --wait: the progress bar path, exit 0, VM gone.
    ok(
        up.cli_with_token(&member, &["vm", "delete", "web", "--wait"]),
        "vm delete",
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let gone = up.cli_with_token(&member, &["vm", "show", "web"]);
    assert_eq!(gone.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.contains("not found") && stderr.contains("not_found"),
        "{stderr}"
    );

    // Readers cannot mutate, and the CLI says so.
    let reader = json(
        up.cli(&[
            "token",
            "create",
            "ro",
            "--role",
            "reader",
            "--project",
            "demo",
            "-o",
            "json",
        ]),
        "reader",
    );
    let r = up.cli_with_token(
        reader["secret"].as_str().expect("secret"),
        &["vm", "create", "x", "--flavor", "tiny", "--image", "base"],
    );
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("forbidden"));

    // Bad input is a clear error, not a crash.
    let r = up.cli(&[
        "flavor", "create", "big", "--vcpus", "1", "--memory", "lots", "--disk", "1GiB",
    ]);
    assert_eq!(r.status.code(), Some(2), "clap rejects the size");
    assert!(String::from_utf8_lossy(&r.stderr).contains("size"));
    let r = up.cli(&["vm", "list", "--state", "dancing"]);
    assert_eq!(r.status.code(), Some(2));

    // A second controller on the same SQLite file refuses to start.
    let second = env_cmd(home.path())
        .args([
            "up",
            "--no-agent",
            "--no-demo",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("second up");
    assert!(!second.status.success());
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(
        msg.contains("already in use by another Stratus controller"),
        "{msg}"
    );

    // SIGTERM: clean shutdown, exit 0.
    let mut up = up;
    let pid = up.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = up.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "stratus up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");

    // And it comes back with its data, and the same token file works.
    let up2 = start_up(home.path(), &data);
    let projects = json(
        up2.cli(&["project", "list", "-o", "json"]),
        "project list after restart",
    );
    assert_eq!(projects["items"][0]["name"], "demo");
}

#[test]
fn every_command_has_help() {
    let home = tempfile::tempdir().expect("home");
    let mut stack: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = stack.pop() {
        let mut args = path.clone();
        args.push("--help".into());
        let out = env_cmd(home.path()).args(&args).output().expect("help");
        assert!(out.status.success(), "stratus {} --help", path.join(" "));
        seen += 1;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Subcommands are listed under "Commands:" until the next heading.
        let mut in_cmds = false;
        for line in text.lines() {
            if line.starts_with("Commands:") {
                in_cmds = true;
                continue;
            }
            if in_cmds {
                if line.trim().is_empty() || !line.starts_with("  ") {
                    in_cmds = false;
                    continue;
                }
                if line.starts_with("   ") {
                    continue; // a wrapped description
                }
                let name = line.split_whitespace().next().unwrap_or("");
                if !name.is_empty() && name != "help" {
                    let mut p = path.clone();
                    p.push(name.to_string());
                    stack.push(p);
                }
            }
        }
    }
    assert!(seen > 30, "only {seen} commands have help");
}

/// `stratus server` on a free loopback port with `extra` arguments (e.g.
/// `--database-url`), data in `home/srv`; waits until it listens. Returns it
/// and its first admin token.
fn start_server(home: &Path, extra: &[&str]) -> (Running, String) {
    let token_file = home.join("admin.token");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let child = env_cmd(home)
        .arg("server")
        .args(extra)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(home.join("srv"))
        .arg("--bootstrap-token-file")
        .arg(&token_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let srv = Running {
        child,
        url: format!("http://127.0.0.1:{port}"),
        home: home.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !token_file.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_string();
    (srv, token)
}

#[test]
fn server_on_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(stratus_test_utils::postgres_url());
    let home = tempfile::tempdir().expect("home");
    let (srv, token) = start_server(home.path(), &["--database-url", &db]);
    let run = |args: &[&str]| {
        env_cmd(home.path())
            .env("STRATUS_URL", &srv.url)
            .env("STRATUS_TOKEN", &token)
            .args(args)
            .output()
            .expect("cli")
    };
    ok(run(&["project", "create", "pg"]), "project on postgres");
    let p = json(run(&["project", "show", "pg", "-o", "json"]), "show");
    assert_eq!(p["name"], "pg");
}

/// SQLite mode runs one controller: a second `stratus server` on the same
/// database refuses to start and says why and what to do instead.
#[test]
fn a_second_sqlite_controller_refuses_to_start() {
    let home = tempfile::tempdir().expect("home");
    let data = home.path().join("srv");
    let (_first, _) = start_server(home.path(), &[]);
    let second = env_cmd(home.path())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .expect("second server");
    assert!(!second.status.success(), "a second controller started");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("already in use by another Stratus controller")
            && err.contains("use PostgreSQL to run several"),
        "{err}"
    );
}
