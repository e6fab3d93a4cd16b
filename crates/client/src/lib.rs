//! The Stratus API client, generated at build time (see `build.rs`) from the
//! checked-in OpenAPI document, `openapi/stratus.json`, by progenitor.
//! Nothing here is written by hand: when the API changes, the document
//! changes (the controller's drift test sees to it) and this client follows.

#![allow(clippy::all, clippy::unwrap_used, missing_docs, unused)]

include!(concat!(env!("OUT_DIR"), "/codegen.rs"));
