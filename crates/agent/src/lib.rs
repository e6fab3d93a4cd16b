//! The host agent: makes one host's VMs match what the controller wants, and
//! tells the controller what it sees. Agents connect in (see
//! `stratus_api_types::agent` for the protocol), so a host needs no open port.
//!
//! # Loops
//!
//! [`Agent::start`] enrolls the host once (or reuses `data_dir/agent.json`),
//! builds the driver and spawns five kinds of tasks that share one
//! in-memory book of what they know (`state.rs`):
//!
//! ```text
//!            long poll                 ┌──────────────┐  one task per VM   ┌─────────┐
//!  controller ───────► desired poller ─► supervisor   ├──► VM workers ─────► driver  │
//!      ▲               (backoff on      │ (dispatch,  │    (converge one    │ (QEMU / │
//!      │                any error)      │  orphans,   ├──► exec requests    │  sim)   │
//!      │                                │  events)    │                     └────┬────┘
//!      │                                └──────────────┘                          │
//!      ├──────────── reporter: every ~2 s and on every change ◄─── vm_list ───────┤
//!      ├──────────── console shipper: every second, with VMs ◄── console_read ────┤
//!      │             guest poller: every 5 s per running VM ◄── guest_info ───────┘
//! ```
//!
//! - The **desired poller** long-polls `GET /v1/agent/desired` (each poll
//!   waiting a random 75-100 % of `desired_wait`), reconnecting with
//!   exponential backoff (0.5 s to 10 s, jittered) so the agent survives a
//!   controller restart; VMs keep running meanwhile. Given several
//!   controllers (`--url A,B,C`), every call of every loop fails over from
//!   one that is down or failing to the next (`controllers.rs`).
//! - The **supervisor** hands each desired VM to its own **worker** (so one
//!   slow VM, e.g. a 30 s graceful stop, never holds up the others), hands VMs
//!   the driver has but the controller does not mention (orphans) to a worker
//!   that destroys them, or with `--orphans keep` leaves them be, and starts
//!   exec requests. The reporter reports orphans either way.
//! - A **worker** converges one VM (see below), reports a failure as `failed`
//!   with the reason, and retries every `retry_interval` and on every change.
//! - The **reporter** posts an observation for every VM, with a generation
//!   that only grows (microseconds since the epoch, or one more than the last),
//!   so the controller never applies an older observation over a newer one,
//!   across agent restarts too. Its period is jittered (see `report.rs`).
//! - The **console shipper** and **guest poller** have work only while the
//!   host has VMs; until then they wait for the VM list to change, without
//!   a timer.
//!
//! # Many simulated hosts in one process
//!
//! [`SimFleet::start`] runs N agents like the one above, each over its own
//! [`SimDriver`], sharing one HTTP connection pool, one bound on calls in
//! flight and one tokio runtime; one multi-use enrollment token enrolls them
//! (see `fleet.rs`). `stratus agent --driver sim --hosts N` is its command
//! line, and benchmarks call it in process.
//!
//! # One VM, as a worker sees it
//!
//! ```text
//!           image cached,               vm_start (desired running,
//!  absent ── vm_create ──► stopped ──── and not held) ─────────────► running ──┐
//!    ▲                      ▲  ▲                                      │  ▲     │ vm_reboot when desired
//!    │                      │  └───── vm_stop (desired stopped) ──────┘  └─────┘ reboot_generation > applied
//!    │ vm_destroy           │
//!    │ (desired deleted,    └── held ◄── running VM crashed or powered off by itself (desired running):
//!    │  or an orphan;            reported as it is (crashed / stopped) and left down until a newer
//!    │  from any state)          desired revision still wants it running (the operator's start)
//! ```
//!
//! A held VM is released when its own intent generation
//! (`DesiredVm::generation`) grows, i.e. when the operator asks for
//! something for that VM (a start); activity on other VMs of the host does
//! not restart it.
//!
//! A reboot is carried out when the desired `reboot_generation` exceeds the
//! one applied; the applied one is kept in `data_dir/vms/<vm-id>.json` so a
//! restarted agent does not reboot again.
//!
//! **Invariant**: VMs outlive the agent. Shutting the agent down (or killing
//! it) stops its loops, never its VMs; a restarted agent re-adopts them
//! through the driver.
//!
//! # Files
//!
//! ```text
//! data_dir/
//!   agent.json              url, host id, credential (mode 0600)
//!   agent.lock              flock'ed: one agent (or fleet) per data dir
//!   hosts/<name>/           a fleet's host: agent.json, images/, vms/ as below
//!   images/<image-id>/      disk, kernel, initrd (+ <part>.sha256 once verified)
//!   vms/<vm-id>.json        applied reboot generation, whether the VM should be up
//!   qemu/                   the QEMU driver's own tree (see stratus_driver::qemu)
//! ```

mod agent;
mod api;
mod config;
mod console;
mod controllers;
mod converge;
mod credentials;
mod error;
mod fleet;
mod images;
mod migrate;
mod pools;
mod report;
mod requests;
mod state;

pub use agent::{Agent, AgentHandle};
pub use config::{AgentConfig, DriverConfig, MigrationSettings, OrphanPolicy};
pub use credentials::{default_host_name, Credentials};
pub use error::{AgentError, ApiError, ImageError};
pub use fleet::{raise_open_files_limit, SimFleet, SimFleetConfig, SimFleetHandle, SimHost};
pub use stratus_driver::{AccelChoice, SimConfig, SimDriver};
