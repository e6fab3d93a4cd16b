//! The Stratus controller.
//!
//! A request flows `http` (thin handlers: extract, call, wrap) → `app`
//! (authorization, validation, intent written to the store with its job) →
//! `stratus-jobs` (the runner carries the job out) → host agents.
//!
//! - [`http`]: the axum router, the OpenAPI document, the error mapping.
//! - [`app`]: one module per resource; the only callers of the datastore.
//! - [`server`]: start-up (store, runner, listener) and shutdown.

pub mod app;
pub mod http;
pub mod server;

pub use app::App;
pub use server::{Server, ServerConfig};
