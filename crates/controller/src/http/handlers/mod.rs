//! Route handlers, one module per resource. Each is annotated for the OpenAPI
//! document (`openapi.rs` lists them); the annotation is the route's contract.

pub mod agent;
pub mod backups;
pub mod flavors;
pub mod hosts;
pub mod images;
pub mod jobs;
pub mod migrate;
pub mod pools;
pub mod projects;
pub mod scheduling;
pub mod snapshots;
pub mod system;
pub mod tokens;
pub mod vms;
pub mod volumes;

use std::sync::Arc;

use crate::app::App;

/// The router's state.
pub type AppState = axum::extract::State<Arc<App>>;
