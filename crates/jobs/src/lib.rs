//! Durable jobs: every operation that touches a host runs as a job.
//!
//! The API layer writes the operator's intent and a `queued` job in one
//! transaction (see `stratus-datastore`), then wakes the [`JobRunner`]. The
//! runner claims queued jobs under a lease, carries out their steps, records
//! each step in the job's log with progress, and writes the outcome together
//! with its effect on the target in one transaction.
//!
//! **Boundary**: this crate knows *what* each kind of job does ([`kinds`]);
//! the store knows how to persist it. Sagas with per-step undo and adoption
//! by other controllers build on this shape: every job already carries its
//! parameters, an owner and a lease, so any controller can pick it up.

pub mod kinds;
mod runner;
pub mod signals;

pub use kinds::JobKind;
pub use runner::{JobRunner, RunnerConfig, RunnerHandle};
pub use signals::Signals;
