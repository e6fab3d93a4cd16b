//! The application layer: what each API operation means, independent of
//! HTTP. Every function takes the authenticated [`Actor`], checks what it may
//! do, validates input, and then reads or writes the store.
//!
//! **Invariant**: foreign resources are indistinguishable from absent ones.
//! Every lookup by name or id goes through `lookup.rs`, which answers
//! `not_found` for resources of projects the actor cannot see.

pub mod agent;
pub mod authz;
pub mod backup_policies;
pub mod backups;
pub mod flavors;
pub mod hosts;
pub mod image_store;
pub mod images;
pub mod jobs;
mod lookup;
pub mod migrate;
pub mod pools;
pub mod projects;
pub mod reconcile;
pub mod scheduling;
pub mod secrets;
pub mod snapshot_policies;
pub mod snapshots;
pub mod tokens;
pub mod vms;
pub mod volumes;

use std::sync::Arc;

pub use authz::Actor;
use stratus_datastore::Datastore;
use stratus_jobs::Signals;
use stratus_scheduler::Scheduler;
use tokio::sync::Notify;

use crate::app::image_store::ImageStore;

/// Most tags a host carries, and most a VM may require or forbid: enough
/// for any real placement policy, few enough that tag sets stay cheap for
/// the scheduler's index.
pub const MAX_TAGS: usize = 32;

/// Everything an API operation needs. Shared by all requests.
pub struct App {
    pub ds: Datastore,
    pub images: ImageStore,
    /// Wakes the job runner when a job is queued.
    pub job_waker: Arc<Notify>,
    /// Wakes long-polling agents and waiting jobs (see `stratus_jobs::signals`).
    pub signals: Arc<Signals>,
    /// Chooses hosts for new VMs and claims them.
    pub scheduler: Arc<Scheduler>,
    /// Recently authenticated API tokens (see [`authz::TokenCache`]).
    pub tokens: authz::TokenCache,
    /// Heartbeats waiting to be written (see [`agent::spawn_heartbeats`]).
    pub heartbeats: agent::HeartbeatBook,
    /// The shared storage pools agents are told of (see [`pools::PoolCache`]).
    pub pools: pools::PoolCache,
}

impl App {
    pub fn new(
        ds: Datastore,
        images: ImageStore,
        job_waker: Arc<Notify>,
        signals: Arc<Signals>,
        scheduler: Arc<Scheduler>,
    ) -> Self {
        App {
            ds,
            images,
            job_waker,
            signals,
            scheduler,
            tokens: authz::TokenCache::default(),
            heartbeats: agent::HeartbeatBook::default(),
            pools: pools::PoolCache::default(),
        }
    }
}
