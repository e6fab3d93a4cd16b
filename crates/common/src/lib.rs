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

/// Most snapshots one VM may hold: each is a layer of every disk's backing
/// chain, and reads of data not rewritten since walk down the chain. The
/// driver enforces it; the controller's snapshot policies keep room under it.
pub const MAX_SNAPSHOTS_PER_VM: usize = 16;
