//! Durable jobs: every operation that touches a host runs as a saga.
//!
//! The API layer writes the operator's intent and a `queued` job in one
//! transaction (see `stratus-datastore`), then wakes the [`JobRunner`]. The
//! runner claims the job under a lease and hands it to the [`SagaEngine`]
//! (steno, with its log in our store): named steps, each an idempotent
//! action with an undo that can run twice, recorded as they advance. A
//! controller that dies mid-saga loses its leases; another (or itself,
//! restarted) adopts the job and resumes the saga from its log. The
//! outcome is written with its effect on the VM in one transaction.
//!
//! Adding an operation means writing its steps in [`sagas`] and its
//! [`JobKind`]: claiming, leases, the log, recovery, cancellation and the
//! step log people read are all here already.
//!
//! **Boundary**: this crate knows *what* each kind of job does; the store
//! knows how to persist it.

pub mod context;
pub mod engine;
pub mod kinds;
mod migrate;
mod requests;
mod runner;
pub mod sagas;
pub mod signals;
mod storage;

pub use context::{StepError, Timing};
pub use engine::{Injection, SagaEngine};
pub use kinds::JobKind;
pub use runner::{JobRunner, RunnerConfig, RunnerHandle, LEASE};
pub use signals::Signals;
