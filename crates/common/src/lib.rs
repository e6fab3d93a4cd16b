//! Vocabulary shared by every Stratus crate: typed ids, byte counts, resource
//! names, roles, generations and the one public [`Error`] type.
//!
//! Nothing here does I/O. The HTTP mapping of [`Error`] lives in the controller
//! (`crates/controller/src/http/error.rs`), the one place errors become status
//! codes.

pub mod bytes;
pub mod error;
pub mod ids;
pub mod name;
pub mod role;
pub mod time;

pub use bytes::ByteCount;
pub use error::{Error, ResourceKind};
pub use ids::*;
pub use name::Name;
pub use role::Role;
