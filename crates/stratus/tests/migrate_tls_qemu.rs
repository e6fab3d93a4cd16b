//! Encrypted, post-copy live migration end to end with real QEMU (TCG),
//! through the CLI (issue 7): agents started with `--migration-tls-dir`
//! move a guest that rewrites a 64 MiB tmpfs file while it counts on its
//! console; the migration is asked to switch to post-copy after one pass
//! and is held to 32 MiB/s, so pre-copy alone could not finish it.
//!
//! Four hosts on this machine (their own data directories, migration
//! traffic over loopback): `host-1` without TLS, `host-2` and `host-3` with
//! certificates from one CA, `host-4` with certificates from another CA.
//! Shown, in order:
//! - hosts report whether they use TLS; the API refuses a move between a
//!   TLS host and a plain one, either way, with an error that names TLS,
//!   and the scheduler picks no host of the other kind; the VM keeps running where it was
//!   and the other host holds nothing of it;
//! - between hosts whose certificates come from different CAs the migration
//!   fails at QEMU's TLS handshake (QEMU really checks its peer, so the
//!   stream really is TLS), with the same guarantees;
//! - host-2 → host-3 over TLS, switching to post-copy: the job succeeds and
//!   says both ("switched to post-copy", "encrypted (TLS)"), the source's
//!   agent logged the switch, and the guest is the same boot with the same
//!   disk data, its counter never restarting, nothing left on host-2.
//!
//! Figures are printed as `MEASURED` lines (`--nocapture`).

mod qemu_world;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_world::*;

/// A directory of freshly made migration certificates (a new CA each).
fn certificates(w: &World, name: &str) -> PathBuf {
    let dir = w.home.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    stratus_test_utils::migration_tls_certificates(&dir);
    dir
}

/// Creates the VM without waiting for it (the caller waits for its guest
/// later, so several boot at once); its QEMU is killed when the guard drops.
fn create_vm(env: &Env, name: &str, flavor: &str) -> (String, KillVm) {
    let op = env.json(&[
        "vm",
        "create",
        name,
        "--flavor",
        flavor,
        "--image",
        "guest",
        "--project",
        "p",
        "-o",
        "json",
    ]);
    let id = op["vm"]["id"].as_str().expect("the VM's id").to_string();
    (id.clone(), KillVm(Some(id)))
}

/// `stratus vm migrate VM --host HOST --wait`, which must fail; the failed
/// job's error message (from the job itself, not the CLI's rendering).
fn migration_fails(env: &Env, vm: &str, host: &str) -> String {
    let out = env.cli(&[
        "vm",
        "migrate",
        vm,
        "--project",
        "p",
        "--host",
        host,
        "--wait",
        "-o",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "migrating {vm} to {host} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The CLI says `job <id> failed: <message>`.
    let job_id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap_or_else(|| panic!("no job named in the CLI's error: {stderr}"));
    let job = env.json(&["job", "show", job_id, "-o", "json"]);
    assert_eq!(job["state"], "failed", "{job}");
    job["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("the failed job has no error message: {job}"))
        .to_string()
}

/// `stratus vm migrate VM [--host HOST]` (no host when `host` is empty),
/// which the API must refuse before making a job: the CLI's error.
fn migration_refused(env: &Env, vm: &str, host: &str) -> String {
    let mut args = vec!["vm", "migrate", vm, "--project", "p"];
    if !host.is_empty() {
        args.extend(["--host", host]);
    }
    let out = env.cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "migrating {vm} to {host:?} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The VM runs on `host` and nothing of it is left on the host whose agent
/// works in `other`.
fn still_on(env: &Env, vm: &str, vm_id: &str, host: &str, here: &Path, other: &Path) {
    assert_eq!(host_of(env, vm), host, "{vm} stays where it was");
    let v = env.vm(vm);
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["migration_target"].is_null(), "{v}");
    assert_eq!(qemus_under(vm_id, here), 1, "{vm} keeps its one QEMU");
    wait_nothing_on(vm_id, other);
}

#[test]
fn real_qemu_tls_postcopy_migration_through_the_api() {
    let started = Instant::now();
    let w = world(); // host-1: no TLS
    let env = &w.env;
    let ca_a = certificates(&w, "certs-a");
    let ca_b = certificates(&w, "certs-b");
    let tls_a = ["--migration-tls-dir", ca_a.to_str().expect("utf8")];
    let tls_b = ["--migration-tls-dir", ca_b.to_str().expect("utf8")];
    let (host2, host2_dir) = w.add_host_with("host-2", &tls_a);
    env.json(&[
        "flavor", "create", "mig", "--vcpus", "1", "--memory", "256MiB", "--disk", "64MiB", "-o",
        "json",
    ]);

    // `mover` on host-2 (host-1 out of service while it is placed), then
    // `plain` on host-1 (the scheduler spreads: host-1 has more free
    // memory). Both boot while the other hosts enroll.
    env.json(&["host", "maintenance", "host-1", "on", "-o", "json"]);
    let (mover_id, _kill_mover) = create_vm(env, "mover", "mig");
    env.json(&["host", "maintenance", "host-1", "off", "-o", "json"]);
    let (plain_id, _kill_plain) = create_vm(env, "plain", "tiny");
    let (_host3, host3_dir) = w.add_host_with("host-3", &tls_a);
    let (_host4, host4_dir) = w.add_host_with("host-4", &tls_b);
    // `probe` on host-4 (host-3 out of service; host-4 is then the emptiest),
    // for the wrong-CA attempt.
    env.json(&["host", "maintenance", "host-3", "on", "-o", "json"]);
    let (probe_id, _kill_probe) = create_vm(env, "probe", "tiny");
    env.json(&["host", "maintenance", "host-3", "off", "-o", "json"]);
    for vm in ["mover", "plain", "probe"] {
        wait_guest(env, vm);
    }
    assert_eq!(host_of(env, "mover"), "host-2");
    assert_eq!(host_of(env, "plain"), "host-1");
    assert_eq!(host_of(env, "probe"), "host-4");
    println!(
        "MEASURED set-up (4 hosts, 3 guests): {:?}",
        started.elapsed()
    );

    let boot_id = line(env, "mover", "cat /proc/sys/kernel/random/boot_id");
    let sum = line(
        env,
        "mover",
        "dd if=/dev/urandom of=/mnt/disk/keep bs=1M count=4 2>/dev/null && sync && \
         sha256sum /mnt/disk/keep | cut -d' ' -f1",
    );

    // The hosts report their transport; the scheduler knows it.
    let h1 = env.json(&["host", "show", "host-1", "-o", "json"]);
    assert_eq!(h1["migration_tls"], false, "{h1}");
    let h2 = env.json(&["host", "show", "host-2", "-o", "json"]);
    assert_eq!(h2["migration_tls"], true, "{h2}");

    // A TLS source and a plain destination, then a plain source and a TLS
    // destination: both refused by the API before any job, naming TLS.
    let t = Instant::now();
    let err = migration_refused(env, "mover", "host-1");
    println!("MEASURED TLS -> plain refused in {:?}: {err}", t.elapsed());
    assert!(
        err.contains("the VM's host uses TLS for migrations and host-1 does not"),
        "{err}"
    );
    still_on(env, "mover", &mover_id, "host-2", &host2_dir, &w.agent_dir);
    let t = Instant::now();
    let err = migration_refused(env, "plain", "host-2");
    println!("MEASURED plain -> TLS refused in {:?}: {err}", t.elapsed());
    assert!(
        err.contains("the VM's host does not use TLS for migrations and host-2 does"),
        "{err}"
    );
    // Without a named host, the scheduler finds no plain host for it.
    let err = migration_refused(env, "plain", "");
    assert!(err.contains("migration transport, here plain"), "{err}");
    still_on(env, "plain", &plain_id, "host-1", &w.agent_dir, &host2_dir);
    let jobs = env.json(&["job", "list", "--kind", "vm_migrate", "-o", "json"]);
    assert_eq!(jobs["items"].as_array().map(Vec::len), Some(0), "{jobs}");

    // Both ends use TLS, but host-4's certificates come from another CA:
    // the source's QEMU does not trust the destination's certificate, so
    // the handshake fails and nothing goes over the wire in the clear.
    let t = Instant::now();
    let err = migration_fails(env, "probe", "host-2");
    println!(
        "MEASURED TLS with another CA failed in {:?}: {err}",
        t.elapsed()
    );
    assert!(
        err.contains("certificate hasn't got a known issuer"),
        "QEMU's TLS handshake refused the peer: {err}"
    );
    still_on(env, "probe", &probe_id, "host-4", &host4_dir, &host2_dir);

    // The real one: over TLS, post-copy after one pass, at 32 MiB/s, while
    // the guest rewrites 64 MiB of memory as fast as it can.
    start_load(env, "mover");
    wait_until("the counter to tick", Duration::from_secs(20), || {
        let t = ticks(env, "mover");
        if t.len() >= 5 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    });
    let t = Instant::now();
    let vm = env.json(&[
        "vm",
        "migrate",
        "mover",
        "--project",
        "p",
        "--host",
        "host-3",
        "--postcopy-after",
        "1",
        "--bandwidth",
        "32MiB",
        "--wait",
        "-o",
        "json",
    ]);
    let took = t.elapsed();
    let host3 = env.json(&["host", "show", "host-3", "-o", "json"]);
    assert_eq!(vm["host_id"], host3["id"], "{vm}");
    let jobs = env.json(&[
        "job",
        "list",
        "--kind",
        "vm_migrate",
        "--state",
        "succeeded",
        "-o",
        "json",
    ]);
    let items = jobs["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "one migration succeeded: {jobs}");
    let job_id = items[0]["id"].as_str().expect("job id");
    let job = env.json(&["job", "show", job_id, "-o", "json"]);
    let messages = job_messages(&job);
    let moved = messages
        .iter()
        .find(|m| m.starts_with("moved to host-3 in "))
        .unwrap_or_else(|| panic!("no `moved to` step: {messages:#?}"));
    println!("MEASURED post-copy over TLS through the API: {took:?}; job says: {moved}");
    assert!(
        moved.contains("; switched to post-copy, "),
        "the migration switched to post-copy: {moved}"
    );
    assert!(
        moved.contains("; encrypted (TLS)"),
        "the job says the move was encrypted: {moved}"
    );
    // QEMU's own state, as the source's agent reported it while the guest
    // already ran on host-3.
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("post-copy (running on the destination)")),
        "QEMU reported post-copy-active: {messages:#?}"
    );
    let source_log = host2.log_text();
    assert!(
        source_log.contains("pre-copy does not converge; switching to post-copy"),
        "the source's agent logged the switch"
    );

    // The same boot, the same data, still counting, on host-3 only.
    wait_guest(env, "mover");
    assert_eq!(host_of(env, "mover"), "host-3");
    same_guest_still_counting(env, "mover", &boot_id, &sum);
    assert_eq!(qemus_under(&mover_id, &host3_dir), 1, "one QEMU on host-3");
    wait_nothing_on(&mover_id, &host2_dir);
    let h2 = env.json(&["host", "show", "host-2", "-o", "json"]);
    assert_eq!(h2["allocated"]["vcpus"], 0, "host-2's claim went: {h2}");

    // And back over TLS: this QEMU arrived over TLS (it holds the server
    // end's credentials) and now sends (the client end). A QEMU once kept
    // its one TLS object and refused every later TLS move.
    let t = Instant::now();
    let vm = env.json(&[
        "vm",
        "migrate",
        "mover",
        "--project",
        "p",
        "--host",
        "host-2",
        "--wait",
        "-o",
        "json",
    ]);
    println!(
        "MEASURED second TLS move, back to host-2: {:?}",
        t.elapsed()
    );
    assert_eq!(vm["host_id"], host2_id(env), "{vm}");
    wait_guest(env, "mover");
    assert_eq!(
        line(env, "mover", "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "the same boot after two moves"
    );
    wait_nothing_on(&mover_id, &host3_dir);
    println!("MEASURED whole test: {:?}", started.elapsed());
}

fn host2_id(env: &Env) -> serde_json::Value {
    env.json(&["host", "show", "host-2", "-o", "json"])["id"].clone()
}
