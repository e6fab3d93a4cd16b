//! The Stratus API client, generated at build time from the checked-in
//! OpenAPI document (`openapi/stratus.json`) by progenitor. Nothing here is
//! written by hand except this comment and the re-exports: when the API
//! changes, the document changes (the controller's drift test sees to it)
//! and this client follows.

#![allow(clippy::all, clippy::unwrap_used, missing_docs)]

progenitor::generate_api!(spec = "../../openapi/stratus.json", interface = Builder,);
