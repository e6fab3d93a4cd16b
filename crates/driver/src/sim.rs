//! A simulated driver: VMs are rows in a map, with the same state machine and
//! events as the QEMU driver, for tests of everything above the driver (agent,
//! scheduler, controller) without booting anything.
//!
//! Cost model: one `SimDriver` is a mutex, a hash map and a small broadcast
//! channel; a VM is one map entry. No task or thread exists per VM or per
//! driver, so one test process can hold 10,000 simulated hosts.
//!
//! The capacity a simulated host reports ([`SimConfig`]) is whatever it is
//! configured with (by default a realistic server: 64 vCPUs, 256 GiB of
//! memory, 4 TiB of disk); each lifecycle operation (create, start, stop,
//! reboot, destroy) takes the configured latency, zero by default.
//!
//! Differences from QEMU, on purpose: `guest_exec` is
//! [`DriverError::Unsupported`]; the console holds one synthetic line per
//! boot; the guest agent "answers" whenever the VM runs, with an address in
//! 10.0.0.0/16 derived from the VM id; [`SimDriver::crash`] injects a crash.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stratus_common::VmId;
use tokio::sync::broadcast;

use crate::{
    ConsoleChunk, Driver, DriverError, ExecOutput, GuestInfo, HostFacts, StopHow, VmEvent,
    VmRuntimeState, VmSpec, VmStatus,
};

/// Events a simulated driver buffers per subscriber. Small on purpose: 10,000
/// drivers in one process each allocate this many slots up front, and a
/// subscriber that falls behind re-reads `vm_list` anyway.
const SIM_EVENT_CAPACITY: usize = 16;

/// The capacity a simulated host reports, and how slow its operations are.
/// The default is a realistic two-socket server: 64 vCPUs, 256 GiB, 4 TiB,
/// instant operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// How long each lifecycle operation (create, start, stop, reboot,
    /// destroy) takes; zero: instant.
    pub latency: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            cpus: 64,
            memory_bytes: 256 << 30,
            disk_bytes: 4 << 40,
            latency: Duration::ZERO,
        }
    }
}

struct SimVm {
    spec: VmSpec,
    state: VmRuntimeState,
    since: DateTime<Utc>,
    /// Completed boots, for the synthetic console.
    boots: u32,
    last_contact: Option<DateTime<Utc>>,
}

/// The simulated driver. See the module docs.
pub struct SimDriver {
    config: SimConfig,
    vms: Mutex<HashMap<VmId, SimVm>>,
    events: broadcast::Sender<VmEvent>,
}

impl SimDriver {
    pub fn new(config: SimConfig) -> Self {
        let (events, _) = broadcast::channel(SIM_EVENT_CAPACITY);
        SimDriver {
            config,
            vms: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// Makes a running (or paused) VM crash, as if its hypervisor died.
    pub fn crash(&self, id: VmId) -> Result<(), DriverError> {
        self.with_vm(id, |vm| {
            if !vm.state.is_active() {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "crash",
                    state: vm.state.to_string(),
                });
            }
            Ok(Some(VmRuntimeState::Crashed {
                reason: "simulated crash (injected)".into(),
            }))
        })
    }

    /// The capacity and latency this simulated host was configured with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// How many VMs this simulated host holds.
    pub fn vm_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, SimVm>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn delay(&self) {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
    }

    /// Runs `f` on the VM; when it returns a new state, records it and sends
    /// the event (only if the state changed).
    fn with_vm<T>(
        &self,
        id: VmId,
        f: impl FnOnce(&mut SimVm) -> Result<T, DriverError>,
    ) -> Result<(), DriverError>
    where
        T: Into<Option<VmRuntimeState>>,
    {
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if let Some(new) = f(vm)?.into() {
            if new != vm.state {
                if new == VmRuntimeState::Running && !vm.state.is_active() {
                    vm.boots += 1;
                }
                vm.state = new.clone();
                vm.since = Utc::now();
                // No receiver is fine: nobody listens yet.
                let _ = self.events.send(VmEvent { id, state: new });
            }
        }
        Ok(())
    }

    fn status_of(id: VmId, vm: &SimVm) -> VmStatus {
        VmStatus {
            id,
            state: vm.state.clone(),
            pid: None,
            since: vm.since,
        }
    }

    /// The fake address of a VM's NIC: 10.0.x.y from the id's random bits.
    fn guest_ip(id: VmId) -> String {
        let b = id.as_uuid().into_bytes();
        format!("10.0.{}.{}", b[14], b[15].clamp(2, 254))
    }
}

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn host_facts(&self) -> Result<HostFacts, DriverError> {
        let used: u64 = self.lock().values().map(|vm| vm.spec.disk_bytes).sum();
        Ok(HostFacts {
            cpus: self.config.cpus,
            memory_bytes: self.config.memory_bytes,
            disk_bytes: self.config.disk_bytes,
            disk_free_bytes: self.config.disk_bytes.saturating_sub(used),
            qemu_version: None,
            accel: Some("sim".into()),
        })
    }

    async fn vm_create(&self, spec: &VmSpec) -> Result<(), DriverError> {
        spec.validate()?;
        self.delay().await;
        let mut vms = self.lock();
        if let Some(existing) = vms.get(&spec.id) {
            if existing.spec != *spec {
                return Err(DriverError::Conflict {
                    id: spec.id,
                    difference: "the simulated VM was created with another spec".into(),
                });
            }
            return Ok(());
        }
        vms.insert(
            spec.id,
            SimVm {
                spec: spec.clone(),
                state: VmRuntimeState::Stopped,
                since: Utc::now(),
                boots: 0,
                last_contact: None,
            },
        );
        Ok(())
    }

    async fn vm_start(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        self.with_vm(id, |_| Ok(VmRuntimeState::Running))
    }

    async fn vm_stop(&self, id: VmId, _graceful_timeout: Duration) -> Result<StopHow, DriverError> {
        self.delay().await;
        let mut how = StopHow::AlreadyStopped;
        self.with_vm(id, |vm| {
            Ok(if vm.state.is_active() {
                how = StopHow::Graceful;
                Some(VmRuntimeState::Stopped)
            } else {
                None
            })
        })?;
        Ok(how)
    }

    async fn vm_reboot(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        self.with_vm(id, |vm| {
            if vm.state != VmRuntimeState::Running {
                return Err(DriverError::InvalidState {
                    id,
                    operation: "reboot",
                    state: vm.state.to_string(),
                });
            }
            vm.boots += 1;
            Ok(None)
        })
    }

    async fn vm_destroy(&self, id: VmId) -> Result<(), DriverError> {
        self.delay().await;
        let removed = self.lock().remove(&id);
        if let Some(vm) = removed {
            if vm.state.is_active() {
                let _ = self.events.send(VmEvent {
                    id,
                    state: VmRuntimeState::Stopped,
                });
            }
        }
        Ok(())
    }

    async fn vm_status(&self, id: VmId) -> Result<Option<VmStatus>, DriverError> {
        Ok(self.lock().get(&id).map(|vm| Self::status_of(id, vm)))
    }

    async fn vm_list(&self) -> Result<Vec<VmStatus>, DriverError> {
        let mut list: Vec<VmStatus> = self
            .lock()
            .iter()
            .map(|(id, vm)| Self::status_of(*id, vm))
            .collect();
        list.sort_by_key(|s| s.id);
        Ok(list)
    }

    async fn console_read(
        &self,
        id: VmId,
        offset: u64,
        max: usize,
    ) -> Result<ConsoleChunk, DriverError> {
        let text = {
            let vms = self.lock();
            let vm = vms.get(&id).ok_or(DriverError::NotFound(id))?;
            (1..=vm.boots)
                .map(|n| format!("stratus-sim: booted {} (boot {n})\n", vm.spec.name))
                .collect::<String>()
        };
        let bytes = text.into_bytes();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(max).min(bytes.len());
        Ok(ConsoleChunk {
            data: bytes[start..end].to_vec(),
            next_offset: end as u64,
            truncated_before: false,
        })
    }

    async fn guest_info(&self, id: VmId) -> Result<GuestInfo, DriverError> {
        let mut vms = self.lock();
        let vm = vms.get_mut(&id).ok_or(DriverError::NotFound(id))?;
        if vm.state != VmRuntimeState::Running {
            return Ok(GuestInfo {
                last_contact: vm.last_contact,
                ..GuestInfo::default()
            });
        }
        let now = Utc::now();
        vm.last_contact = Some(now);
        Ok(GuestInfo {
            connected: true,
            agent_version: Some("sim".into()),
            os_name: Some("Stratus simulated guest".into()),
            os_version: Some("1".into()),
            kernel: Some("sim".into()),
            ip_addresses: vec![Self::guest_ip(id)],
            last_contact: Some(now),
        })
    }

    async fn guest_exec(
        &self,
        id: VmId,
        _argv: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput, DriverError> {
        if !self.lock().contains_key(&id) {
            return Err(DriverError::NotFound(id));
        }
        Err(DriverError::Unsupported(
            "the simulated driver cannot run commands in a guest".into(),
        ))
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::spec::tests::spec;

    fn sim() -> SimDriver {
        SimDriver::new(SimConfig::default())
    }

    #[tokio::test]
    async fn lifecycle_follows_the_state_machine_and_sends_events() {
        let d = sim();
        let mut events = d.subscribe();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_create(&s).await.expect("create is idempotent");
        let st = d.vm_status(s.id).await.expect("status").expect("known");
        assert_eq!(st.state, VmRuntimeState::Stopped);

        d.vm_start(s.id).await.expect("start");
        d.vm_start(s.id).await.expect("start is idempotent");
        assert_eq!(
            events.recv().await.expect("event"),
            VmEvent {
                id: s.id,
                state: VmRuntimeState::Running
            }
        );

        d.vm_reboot(s.id).await.expect("reboot");
        let console = d.console_read(s.id, 0, 4096).await.expect("console");
        let text = String::from_utf8(console.data).expect("utf8");
        assert_eq!(text.matches("booted web-1").count(), 2, "{text}");

        assert_eq!(
            d.vm_stop(s.id, Duration::from_secs(1)).await.expect("stop"),
            StopHow::Graceful
        );
        assert_eq!(
            d.vm_stop(s.id, Duration::from_secs(1)).await.expect("stop"),
            StopHow::AlreadyStopped
        );
        assert_eq!(
            events.recv().await.expect("event").state,
            VmRuntimeState::Stopped
        );
        assert!(matches!(
            d.vm_reboot(s.id).await,
            Err(DriverError::InvalidState { .. })
        ));

        d.vm_destroy(s.id).await.expect("destroy");
        d.vm_destroy(s.id).await.expect("destroy is idempotent");
        assert!(d.vm_status(s.id).await.expect("status").is_none());
        assert!(matches!(
            d.vm_start(s.id).await,
            Err(DriverError::NotFound(_))
        ));
        assert!(
            events.try_recv().is_err(),
            "no event for destroying a stopped VM"
        );
    }

    #[tokio::test]
    async fn injected_crash_is_reported_and_start_recovers() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        assert!(d.crash(s.id).is_err(), "a stopped VM cannot crash");
        d.vm_start(s.id).await.expect("start");
        let mut events = d.subscribe();
        d.crash(s.id).expect("crash");
        let ev = events.recv().await.expect("event");
        assert!(matches!(ev.state, VmRuntimeState::Crashed { .. }), "{ev:?}");
        assert!(!d.guest_info(s.id).await.expect("info").connected);
        assert_eq!(
            d.vm_stop(s.id, Duration::ZERO).await.expect("stop"),
            StopHow::AlreadyStopped
        );
        d.vm_start(s.id).await.expect("start after crash");
        assert_eq!(
            events.recv().await.expect("event").state,
            VmRuntimeState::Running
        );
    }

    #[tokio::test]
    async fn guest_agent_answers_while_running_and_exec_is_unsupported() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        assert!(!d.guest_info(s.id).await.expect("info").connected);
        d.vm_start(s.id).await.expect("start");
        let info = d.guest_info(s.id).await.expect("info");
        assert!(info.connected);
        assert!(info.last_contact.is_some());
        assert_eq!(info.ip_addresses.len(), 1);
        assert!(info.ip_addresses[0].starts_with("10.0."), "{info:?}");
        assert!(matches!(
            d.guest_exec(s.id, &["true".into()], Duration::from_secs(1))
                .await,
            Err(DriverError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn create_refuses_bad_and_conflicting_specs() {
        let d = sim();
        let mut s = spec();
        s.vcpus = 0;
        assert!(matches!(
            d.vm_create(&s).await,
            Err(DriverError::InvalidSpec { .. })
        ));
        let s = spec();
        d.vm_create(&s).await.expect("create");
        let mut other = s.clone();
        other.memory_bytes *= 2;
        assert!(matches!(
            d.vm_create(&other).await,
            Err(DriverError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn console_offsets_resume_where_the_reader_left() {
        let d = sim();
        let s = spec();
        d.vm_create(&s).await.expect("create");
        d.vm_start(s.id).await.expect("start");
        let a = d.console_read(s.id, 0, 5).await.expect("read");
        assert_eq!(a.data, b"strat");
        let b = d
            .console_read(s.id, a.next_offset, 4096)
            .await
            .expect("read");
        assert!(b.data.ends_with(b"(boot 1)\n"));
        let c = d
            .console_read(s.id, b.next_offset, 4096)
            .await
            .expect("read");
        assert!(c.data.is_empty());
        assert_eq!(c.next_offset, b.next_offset);
    }

    #[tokio::test]
    async fn latency_is_applied_to_every_lifecycle_operation() {
        let latency = Duration::from_millis(30);
        let d = SimDriver::new(SimConfig {
            latency,
            ..SimConfig::default()
        });
        let s = spec();
        let timed = |t: std::time::Instant, op: &str| {
            assert!(t.elapsed() >= latency, "{op} took {:?}", t.elapsed());
        };
        let t = std::time::Instant::now();
        d.vm_create(&s).await.expect("create");
        timed(t, "create");
        let t = std::time::Instant::now();
        d.vm_start(s.id).await.expect("start");
        timed(t, "start");
        let t = std::time::Instant::now();
        d.vm_stop(s.id, Duration::ZERO).await.expect("stop");
        timed(t, "stop");
        let t = std::time::Instant::now();
        d.vm_destroy(s.id).await.expect("destroy");
        timed(t, "destroy");
        // Queries are never slowed down.
        let t = std::time::Instant::now();
        d.vm_list().await.expect("list");
        d.host_facts().await.expect("facts");
        assert!(t.elapsed() < latency);
    }

    #[tokio::test]
    async fn facts_are_the_configured_capacity() {
        let d = sim();
        let f = d.host_facts().await.expect("facts");
        assert_eq!(
            (f.cpus, f.memory_bytes, f.disk_bytes),
            (64, 256 << 30, 4 << 40),
            "a realistic server by default"
        );
        let d = SimDriver::new(SimConfig {
            cpus: 8,
            memory_bytes: 32 << 30,
            disk_bytes: 500 << 30,
            latency: Duration::ZERO,
        });
        let s = spec();
        d.vm_create(&s).await.expect("create");
        let f = d.host_facts().await.expect("facts");
        assert_eq!(
            (f.cpus, f.memory_bytes, f.disk_bytes),
            (8, 32 << 30, 500 << 30)
        );
        assert_eq!(f.disk_free_bytes, (500 << 30) - s.disk_bytes);
        assert_eq!(f.accel.as_deref(), Some("sim"));
    }

    #[tokio::test]
    async fn ten_thousand_hosts_fit_in_one_process() {
        let t = std::time::Instant::now();
        let hosts: Vec<Arc<dyn Driver>> = (0..10_000)
            .map(|_| Arc::new(sim()) as Arc<dyn Driver>)
            .collect();
        for host in &hosts {
            for _ in 0..2 {
                let s = spec();
                host.vm_create(&s).await.expect("create");
                host.vm_start(s.id).await.expect("start");
            }
        }
        let mut running = 0;
        for host in &hosts {
            running += host.vm_list().await.expect("list").len();
        }
        assert_eq!(running, 20_000);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "10,000 simulated hosts took {:?}",
            t.elapsed()
        );
    }
}
