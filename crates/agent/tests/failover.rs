//! An agent given several controllers (`--url A,B`): it enrolls,
//! heartbeats and runs VMs through whichever one answers, and follows when
//! the one it talks to goes away. Two live controllers need PostgreSQL (the
//! chaos benchmark's test runs them); here one controller on SQLite answers
//! at one address, then, after a restart, at the other: what an agent sees
//! when its controller dies and another one serves.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{cloud, sim, sim_state, wait_for, Cloud};
use stratus_agent::{
    Agent, AgentConfig, AgentError, Credentials, DriverConfig, SimFleet, SimFleetConfig,
};
use stratus_client::types::{HostState, VmState};
use stratus_common::{HostId, VmId};
use stratus_driver::VmRuntimeState;

const JOB: Duration = Duration::from_secs(30);

/// An address nothing listens on (a port just released).
fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn heartbeat(cloud: &Cloud, host: HostId) -> chrono::DateTime<chrono::Utc> {
    let h = cloud
        .admin
        .host_view()
        .host(host.to_string())
        .send()
        .await
        .expect("host_view")
        .into_inner();
    assert_eq!(h.state, HostState::Up, "{h:?}");
    h.last_heartbeat_at.expect("a heartbeat")
}

#[tokio::test]
async fn an_agent_fails_over_to_the_controller_that_answers() {
    let (mut cloud, _files) = cloud().await;
    let dead = closed_addr();
    let list = format!("http://{dead},{}", cloud.url);
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let mut c = AgentConfig::new(&list, dir.path(), DriverConfig::Instance(sim.clone()));
    c.name = Some("multi".into());
    c.desired_wait = Duration::from_secs(3);
    c.retry_interval = Duration::from_secs(2);
    c.report_interval = Duration::from_secs(1);
    c.enroll_token = Some(cloud.enroll_token().await);

    // The first controller is not there: the host enrolls through the
    // second, heartbeats, and runs a VM.
    let agent = Agent::start(c)
        .await
        .expect("enrolls through the second URL");
    let host = agent.host_id();
    let first = wait_for("a heartbeat", Duration::from_secs(10), || async {
        let h = cloud
            .admin
            .host_view()
            .host(host.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        match (h.state, h.last_heartbeat_at) {
            (HostState::Up, Some(t)) => Ok(t),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (vm, job) = cloud.vm_create("p", "web", "small", "img").await;
    cloud.job_succeeds(&job, JOB).await;
    let id = VmId(vm.id.0);
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Running));
    let creds = Credentials::load(dir.path())
        .expect("credential")
        .expect("saved");
    assert_eq!(creds.url, list, "the credential keeps the whole list");
    wait_for("a later heartbeat", Duration::from_secs(10), || async {
        let t = heartbeat(&cloud, host).await;
        if t > first {
            Ok(())
        } else {
            Err(t.to_string())
        }
    })
    .await;

    // The controller goes away and comes back at the first address: the
    // agent's long poll and reports follow it there, so an operation made
    // there reaches the host, and heartbeats go on.
    cloud.stop().await;
    cloud.addr = dead;
    cloud.url = format!("http://{dead}");
    cloud.admin = common::client(&cloud.url, &cloud.admin_token);
    cloud.start_again().await;
    let before = heartbeat(&cloud, host).await;
    let op = cloud
        .admin
        .vm_stop()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_stop")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    assert_eq!(sim_state(&sim, id).await, Some(VmRuntimeState::Stopped));
    assert_eq!(cloud.vm(&vm.id).await.state, VmState::Stopped);
    wait_for(
        "a heartbeat at the other address",
        Duration::from_secs(10),
        || async {
            let t = heartbeat(&cloud, host).await;
            if t > before {
                Ok(())
            } else {
                Err(t.to_string())
            }
        },
    )
    .await;
    agent.shutdown().await;
}

#[tokio::test]
async fn a_fleet_fails_over_as_one_and_a_bad_list_is_refused() {
    let (cloud, _files) = cloud().await;
    let dead = closed_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = SimFleetConfig::new(format!("http://{dead}, {}/", cloud.url), dir.path(), 3);
    c.name_prefix = Some("multi".into());
    c.enroll_token = Some(cloud.enroll_token_for(3).await);
    c.report_interval = Duration::from_secs(1);
    c.desired_wait = Duration::from_secs(3);
    c.retry_interval = Duration::from_secs(2);
    let fleet = SimFleet::start(c).await.expect("the fleet enrolls");
    assert_eq!(fleet.enrolled_now(), 3);
    for h in fleet.host_ids() {
        wait_for("each host up", Duration::from_secs(10), || async {
            let h = cloud
                .admin
                .host_view()
                .host(h.to_string())
                .send()
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if h.state == HostState::Up && h.last_heartbeat_at.is_some() {
                Ok(())
            } else {
                Err(format!("{:?}", h.state))
            }
        })
        .await;
    }
    let (vm, job) = cloud.vm_create("p", "web", "small", "img").await;
    cloud.job_succeeds(&job, JOB).await;
    let on = fleet
        .hosts()
        .iter()
        .find(|h| Some(h.host_id.0) == vm.host_id.as_ref().map(|x| x.0))
        .expect("placed on a fleet host");
    assert_eq!(
        sim_state(&on.driver, VmId(vm.id.0)).await,
        Some(VmRuntimeState::Running)
    );
    fleet.shutdown().await;

    // A list with an empty entry or a non-HTTP URL stops the agent at once,
    // naming the entry.
    let bad = tempfile::tempdir().expect("tempdir");
    for list in [format!("{},", cloud.url), format!("{},ftp://x", cloud.url)] {
        let err = match Agent::start(AgentConfig::new(&list, bad.path(), DriverConfig::sim())).await
        {
            Ok(_) => panic!("{list:?} was accepted"),
            Err(e) => e,
        };
        assert!(matches!(err, AgentError::ControllerUrl { .. }), "{err}");
    }
}
