//! A simulated fleet (many hosts from one process, one handle) against a real
//! controller in process: one multi-use token enrolls every host, each comes
//! up with the configured capacity and tags, a VM lands on one of them, a
//! restarted fleet reuses its credentials, and shutdown ends every loop.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, Cloud};
use stratus_agent::{SimFleet, SimFleetConfig, SimFleetHandle, SimHost};
use stratus_client::types::{Host, HostState, VmState};
use stratus_common::{HostId, VmId};
use stratus_driver::{Driver, VmRuntimeState};

const HOSTS: usize = 200;

fn fleet_config(cloud: &Cloud, dir: &std::path::Path, token: Option<String>) -> SimFleetConfig {
    let mut c = SimFleetConfig::new(&cloud.url, dir, HOSTS);
    c.name_prefix = Some("rack".into());
    c.enroll_token = token;
    c.tags = vec!["ssd".into(), "rack-a".into()];
    c.cpus = 32;
    c.memory_bytes = 128 << 30;
    c.disk_bytes = 2 << 40;
    c.report_interval = Duration::from_secs(2);
    // Short long polls: a controller shutdown waits for them.
    c.desired_wait = Duration::from_secs(3);
    c.retry_interval = Duration::from_secs(2);
    c
}

/// Every host of the controller, all pages.
async fn all_hosts(cloud: &Cloud) -> Result<Vec<Host>, String> {
    let mut hosts = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut call = cloud.admin.host_list().limit(100u32);
        if let Some(c) = &cursor {
            call = call.cursor(c.clone());
        }
        let page = call.send().await.map_err(|e| e.to_string())?.into_inner();
        hosts.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(hosts),
        }
    }
}

async fn all_up(cloud: &Cloud, ids: &HashSet<HostId>) -> Vec<Host> {
    wait_for(
        "every simulated host to be up",
        Duration::from_secs(15),
        || async {
            let hosts = all_hosts(cloud).await?;
            let up = hosts
                .iter()
                .filter(|h| ids.contains(&HostId(h.id.0)) && h.state == HostState::Up)
                .count();
            if up == ids.len() {
                Ok(hosts)
            } else {
                Err(format!(
                    "{up} of {} up ({} hosts known)",
                    ids.len(),
                    hosts.len()
                ))
            }
        },
    )
    .await
}

async fn vm_running_on(host: &SimHost, vm: VmId, what: &str) {
    wait_for(what, Duration::from_secs(10), || async {
        match host.driver.vm_status(vm).await.map_err(|e| e.to_string())? {
            Some(s) if s.state == VmRuntimeState::Running => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Shuts the fleet down and checks that every host's loops ended: nothing
/// but the test holds a host's driver any more.
async fn shutdown_and_check(fleet: SimFleetHandle) {
    let hosts: Vec<SimHost> = fleet.hosts().to_vec();
    let t = Instant::now();
    fleet.shutdown().await;
    println!("TIMING fleet of {HOSTS}: shutdown {:?}", t.elapsed());
    for h in &hosts {
        assert_eq!(
            Arc::strong_count(&h.driver),
            1,
            "a task of {} outlived the shutdown",
            h.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_sim_hosts_enrolls_once_runs_vms_and_restarts_on_its_credentials() {
    common::logging();
    let cloud = Cloud::start().await;
    let files = tempfile::tempdir().expect("tempdir");
    cloud.project("p").await;
    cloud.flavor("small", 128, 64).await;
    let disk = common::small_qcow2(files.path());
    cloud.image("p", "img", &disk, None, None, None).await;
    let dir = tempfile::tempdir().expect("tempdir");

    // One token, HOSTS uses.
    let token = cloud.enroll_token_for(HOSTS as u32).await;
    let t = Instant::now();
    let fleet = SimFleet::start(fleet_config(&cloud, dir.path(), Some(token)))
        .await
        .expect("fleet starts");
    println!(
        "TIMING fleet of {HOSTS}: enrolled and started in {:?}",
        t.elapsed()
    );
    assert_eq!(fleet.len(), HOSTS);
    assert_eq!(fleet.enrolled_now(), HOSTS);
    assert_eq!(fleet.hosts()[0].name, "rack-00001");
    assert_eq!(fleet.hosts()[HOSTS - 1].name, "rack-00200");
    assert!(dir.path().join("hosts/rack-00001/agent.json").is_file());
    let ids: HashSet<HostId> = fleet.host_ids().into_iter().collect();
    assert_eq!(ids.len(), HOSTS, "every host has its own id");

    // Up, with the configured capacity and tags.
    let hosts = all_up(&cloud, &ids).await;
    println!("TIMING fleet of {HOSTS}: all up after {:?}", t.elapsed());
    assert_eq!(hosts.len(), HOSTS, "no other host exists");
    for h in &hosts {
        assert!(h.name.starts_with("rack-"), "{}", h.name);
        assert_eq!(h.cpus, 32, "{}", h.name);
        assert_eq!(h.memory_bytes, 128 << 30, "{}", h.name);
        assert_eq!(h.disk_bytes, 2 << 40, "{}", h.name);
        assert_eq!(h.accel.as_deref(), Some("sim"));
        let mut tags = h.tags.clone();
        tags.sort();
        assert_eq!(tags, ["rack-a", "ssd"], "{}", h.name);
    }

    // A VM created through the API lands on one of them and runs there.
    let (vm, job) = cloud.vm_create("p", "web-1", "small", "img").await;
    cloud.job_succeeds(&job, Duration::from_secs(15)).await;
    let v = cloud.vm(&vm.id).await;
    assert_eq!(v.state, VmState::Running, "{v:?}");
    let on = HostId(v.host_id.as_ref().expect("placed").0);
    let host = fleet
        .hosts()
        .iter()
        .find(|h| h.host_id == on)
        .expect("placed on a fleet host")
        .clone();
    let vm_id = VmId(vm.id.0);
    vm_running_on(&host, vm_id, "the VM to run in its host's driver").await;
    let elsewhere: usize = fleet
        .hosts()
        .iter()
        .filter(|h| h.host_id != on)
        .map(|h| h.driver.vm_count())
        .sum();
    assert_eq!(elsewhere, 0, "the VM exists on one host only");
    // The fleet's hosts share one image cache.
    let image = vm.image_id.to_string();
    assert!(dir
        .path()
        .join("images")
        .join(&image)
        .join("disk")
        .is_file());
    assert!(!host.data_dir.join("images").join(&image).exists());

    drop(host);
    shutdown_and_check(fleet).await;

    // Restarted without a token: every host reuses its credential.
    let t = Instant::now();
    let fleet = SimFleet::start(fleet_config(&cloud, dir.path(), None))
        .await
        .expect("fleet restarts on its credentials");
    println!("TIMING fleet of {HOSTS}: restarted in {:?}", t.elapsed());
    assert_eq!(fleet.enrolled_now(), 0);
    let again: HashSet<HostId> = fleet.host_ids().into_iter().collect();
    assert_eq!(again, ids, "the same hosts");
    let hosts = all_up(&cloud, &ids).await;
    assert_eq!(hosts.len(), HOSTS, "no new host enrolled");
    // The simulated VM died with the old process; the restarted host
    // recreates it from the desired state.
    let host = fleet
        .hosts()
        .iter()
        .find(|h| h.host_id == on)
        .expect("same host")
        .clone();
    vm_running_on(&host, vm_id, "the restarted host to recreate its VM").await;
    drop(host);
    shutdown_and_check(fleet).await;
}
