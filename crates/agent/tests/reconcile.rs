//! The reconcilers end to end: a real controller in process (its reconciler
//! running as `stratus server` runs it) and a simulated host. A crashed VM
//! with restart policy `on_crash` is started again by the controller, a
//! crash loop is given up after the limit, and orphans are reported (and,
//! with `--orphans keep`, left running).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent_config, cloud, sim, sim_state, wait_for, Cloud};
use stratus_agent::{Agent, AgentHandle, OrphanPolicy};
use stratus_client::types::{self, JobState, OrphanAction, RestartPolicy, Vm, VmState};
use stratus_common::VmId;
use stratus_driver::{BootSpec, Driver, ImageFormat, NicSpec, SimDriver, VmRuntimeState, VmSpec};

const JOB: Duration = Duration::from_secs(30);
/// Crash to running again: a report, a reconciler pass (every 2 s), a job.
const RESTART: Duration = Duration::from_secs(20);

/// A simulated agent with the given orphan policy (the common set-up
/// otherwise).
async fn start_agent(
    cloud: &Cloud,
    dir: &Path,
    name: &str,
    driver: Arc<SimDriver>,
    orphans: OrphanPolicy,
) -> AgentHandle {
    let mut c = agent_config(cloud, dir, name, driver);
    c.orphans = orphans;
    c.enroll_token = Some(cloud.enroll_token().await);
    Agent::start(c).await.expect("agent starts")
}

/// Creates a running VM with `policy`.
async fn create_running(cloud: &Cloud, name: &str, policy: RestartPolicy) -> Vm {
    let op = cloud
        .admin
        .vm_create()
        .body(types::VmCreate {
            name: name.parse().expect("name"),
            project: Some("p".into()),
            flavor: "small".into(),
            image: "img".into(),
            start: None,
            zone: None,
            cluster: None,
            group: None,
            require_tags: Vec::new(),
            forbid_tags: Vec::new(),
            restart_policy: Some(policy),
            pool: None,
        })
        .send()
        .await
        .expect("vm_create")
        .into_inner();
    assert_eq!(op.vm.restart_policy, policy);
    cloud.job_succeeds(&op.job, JOB).await;
    let v = cloud.vm(&op.vm.id).await;
    assert_eq!(v.state, VmState::Running, "{v:?}");
    v
}

/// The VM's `vm_start` jobs, newest first.
async fn start_jobs(cloud: &Cloud, vm: &Vm) -> Vec<types::Job> {
    let mut jobs = cloud
        .admin
        .job_list()
        .target(vm.id.0)
        .kind("vm_start")
        .send()
        .await
        .expect("job_list")
        .into_inner()
        .items;
    jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at));
    jobs
}

/// Crashes the VM and waits until the controller has started it again by
/// itself: its `n`-th start job succeeded and it runs.
async fn crash_and_see_it_restarted(cloud: &Cloud, sim: &SimDriver, vm: &Vm, n: usize) {
    let id = VmId(vm.id.0);
    let t = Instant::now();
    sim.crash(id).expect("crash");
    wait_for(
        &format!("automatic restart {n} of {}", vm.name),
        RESTART,
        || async {
            let jobs = start_jobs(cloud, vm).await;
            let v = cloud.vm(&vm.id).await;
            match jobs.first() {
                Some(j)
                    if jobs.len() == n
                        && j.state == JobState::Succeeded
                        && v.state == VmState::Running =>
                {
                    Ok(())
                }
                _ => Err(format!(
                    "{} start jobs ({:?}); VM {} ({:?})",
                    jobs.len(),
                    jobs.first().map(|j| j.state),
                    v.state,
                    v.state_reason
                )),
            }
        },
    )
    .await;
    println!(
        "TIMING crash -> restarted by the controller: {:?}",
        t.elapsed()
    );
    assert_eq!(sim_state(sim, id).await, Some(VmRuntimeState::Running));
}

#[tokio::test]
async fn sim_crashed_on_crash_vm_is_restarted_by_the_controller() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(
        &cloud,
        dir.path(),
        "sim-1",
        sim.clone(),
        OrphanPolicy::Destroy,
    )
    .await;
    let vm = create_running(&cloud, "web", RestartPolicy::OnCrash).await;
    let steady = create_running(&cloud, "steady", RestartPolicy::Never).await;

    crash_and_see_it_restarted(&cloud, &sim, &vm, 1).await;

    // The same crash of a VM with policy never: left down.
    let steady_id = VmId(steady.id.0);
    sim.crash(steady_id).expect("crash");
    wait_for(
        "steady to show crashed",
        Duration::from_secs(10),
        || async {
            match cloud.vm(&steady.id).await.state {
                VmState::Crashed => Ok(()),
                s => Err(s.to_string()),
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cloud.vm(&steady.id).await.state, VmState::Crashed);
    assert!(start_jobs(&cloud, &steady).await.is_empty());
    assert!(matches!(
        sim_state(&sim, steady_id).await,
        Some(VmRuntimeState::Crashed { .. })
    ));

    // Switched to on_crash, the crashed VM is started at the next pass.
    let changed = cloud
        .admin
        .vm_update()
        .vm(steady.id.to_string())
        .body(types::VmUpdate {
            restart_policy: Some(RestartPolicy::OnCrash),
        })
        .send()
        .await
        .expect("vm_update")
        .into_inner();
    assert_eq!(changed.restart_policy, RestartPolicy::OnCrash);
    wait_for("steady restarted", RESTART, || async {
        let v = cloud.vm(&steady.id).await;
        match (v.state, start_jobs(&cloud, &steady).await.len()) {
            (VmState::Running, 1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        sim_state(&sim, steady_id).await,
        Some(VmRuntimeState::Running)
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn sim_crash_loop_is_given_up_after_the_limit() {
    let (cloud, _files) = cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = sim();
    let agent = start_agent(
        &cloud,
        dir.path(),
        "sim-1",
        sim.clone(),
        OrphanPolicy::Destroy,
    )
    .await;
    let vm = create_running(&cloud, "loopy", RestartPolicy::OnCrash).await;
    let id = VmId(vm.id.0);

    // The default limit: 3 automatic restarts within 10 minutes.
    for n in 1..=3 {
        crash_and_see_it_restarted(&cloud, &sim, &vm, n).await;
    }
    sim.crash(id).expect("fourth crash");
    let v = wait_for("restarts to be given up", RESTART, || async {
        let v = cloud.vm(&vm.id).await;
        match (&v.state, &v.state_reason) {
            (VmState::Crashed, Some(r)) if r.contains("automatic restarts given up") => Ok(v),
            _ => Err(format!("{} ({:?})", v.state, v.state_reason)),
        }
    })
    .await;
    println!("given up: {:?}", v.state_reason);
    // And it stays so: no fourth start, the reason kept through reports.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v = cloud.vm(&vm.id).await;
    assert_eq!(v.state, VmState::Crashed);
    assert!(
        v.state_reason
            .as_deref()
            .is_some_and(|r| r.contains("automatic restarts given up")),
        "{:?}",
        v.state_reason
    );
    assert_eq!(start_jobs(&cloud, &vm).await.len(), 3);
    assert!(matches!(
        sim_state(&sim, id).await,
        Some(VmRuntimeState::Crashed { .. })
    ));

    // The operator starts it: it runs, and automatic restarts are re-armed.
    let op = cloud
        .admin
        .vm_start()
        .vm(vm.id.to_string())
        .send()
        .await
        .expect("vm_start")
        .into_inner();
    cloud.job_succeeds(&op.job, JOB).await;
    crash_and_see_it_restarted(&cloud, &sim, &vm, 5).await;
    agent.shutdown().await;
}

/// A VM the controller never heard of, running on a simulated host.
async fn stray(sim: &SimDriver) -> VmId {
    let spec = VmSpec {
        id: VmId::new(),
        name: "stray".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disk_bytes: 1 << 30,
        image: "/nowhere.qcow2".into(),
        image_format: ImageFormat::Qcow2,
        restore_from: None,
        pool: None,
        boot: BootSpec::Firmware,
        nic: NicSpec::User,
    };
    sim.vm_create(&spec).await.expect("create");
    sim.vm_start(spec.id).await.expect("start");
    spec.id
}

/// Waits until the host view lists `id` as an orphan with `action`.
async fn orphan_listed(cloud: &Cloud, agent: &AgentHandle, id: VmId, action: OrphanAction) {
    wait_for(
        &format!("orphan {id} listed as {action}"),
        Duration::from_secs(15),
        || async {
            let h = cloud
                .admin
                .host_view()
                .host(agent.host_id().to_string())
                .send()
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match h.orphans.iter().find(|o| o.vm_id.0 == id.0) {
                Some(o) if o.action == action => {
                    assert!(o.first_seen_at <= o.last_seen_at);
                    Ok(())
                }
                _ => Err(format!("{:?}", h.orphans)),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn sim_orphans_are_reported_and_kept_or_destroyed_by_policy() {
    let (cloud, _files) = cloud().await;
    let (dir1, dir2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (sim1, sim2) = (sim(), sim());
    let keeper = start_agent(
        &cloud,
        dir1.path(),
        "keeper",
        sim1.clone(),
        OrphanPolicy::Keep,
    )
    .await;
    let cleaner = start_agent(
        &cloud,
        dir2.path(),
        "cleaner",
        sim2.clone(),
        OrphanPolicy::Destroy,
    )
    .await;

    // keep: reported as kept, left running.
    let kept = stray(&sim1).await;
    orphan_listed(&cloud, &keeper, kept, OrphanAction::Kept).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sim_state(&sim1, kept).await, Some(VmRuntimeState::Running));
    orphan_listed(&cloud, &keeper, kept, OrphanAction::Kept).await;

    // destroy (the default): reported as destroyed, gone from the host.
    let destroyed = stray(&sim2).await;
    orphan_listed(&cloud, &cleaner, destroyed, OrphanAction::Destroyed).await;
    assert_eq!(sim_state(&sim2, destroyed).await, None);

    // The keeping host still runs the controller's VMs as usual.
    let vm = create_running(&cloud, "web", RestartPolicy::Never).await;
    assert!(vm.host_id.is_some());
    assert_eq!(sim_state(&sim1, kept).await, Some(VmRuntimeState::Running));

    keeper.shutdown().await;
    cleaner.shutdown().await;
}
