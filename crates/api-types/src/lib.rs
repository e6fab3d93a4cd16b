//! What crosses the API boundary: `params` come in, `views` go out.
//!
//! These types carry serde and OpenAPI (utoipa) derives and nothing else: no
//! database types, no HTTP framework types. The controller converts store
//! records into views; the CLI gets its own copies of these shapes from the
//! generated client (`crates/client`), built from the checked-in OpenAPI
//! document, so this crate is the single source of the API's shapes.

pub mod agent;
pub mod params;
pub mod views;
