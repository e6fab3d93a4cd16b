//! The one public error type.
//!
//! Every layer below the HTTP handlers returns [`Error`] (or a module error
//! that converts into it). It says *what* went wrong in client terms; the
//! controller's `http::error` module is the single place that turns it into a
//! status code and the JSON body `{error_code, message, request_id}`.
//!
//! Messages are written for the operator who sent the request: they name the
//! field or resource and say what would be accepted. Internal errors keep
//! their detail for the log and show the client only "internal error".

use std::fmt;

/// Kinds of resources, for "not found" and conflict messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    Project,
    Token,
    Host,
    EnrollmentToken,
    Image,
    Flavor,
    Vm,
    Job,
    ServerGroup,
    Cluster,
    BackupTarget,
    Backup,
    BackupPolicy,
    Snapshot,
    SnapshotPolicy,
    Volume,
    StoragePool,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Project => "project",
            ResourceKind::Token => "token",
            ResourceKind::Host => "host",
            ResourceKind::EnrollmentToken => "enrollment token",
            ResourceKind::Image => "image",
            ResourceKind::Flavor => "flavor",
            ResourceKind::Vm => "vm",
            ResourceKind::Job => "job",
            ResourceKind::ServerGroup => "server group",
            ResourceKind::Cluster => "cluster",
            ResourceKind::BackupTarget => "backup target",
            ResourceKind::Backup => "backup",
            ResourceKind::BackupPolicy => "backup policy",
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::SnapshotPolicy => "snapshot policy",
            ResourceKind::Volume => "volume",
            ResourceKind::StoragePool => "storage pool",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or a field is invalid (400).
    #[error("{message}")]
    InvalidRequest {
        /// The offending field, dotted for nested fields (`source.path`).
        field: Option<String>,
        message: String,
    },
    /// No credentials, or credentials that are not valid (401).
    #[error("{message}")]
    Unauthenticated { message: String },
    /// Valid credentials that do not allow this action (403).
    #[error("{message}")]
    Forbidden { message: String },
    /// The resource does not exist *or is not visible to the caller* (404).
    /// Foreign resources are reported exactly like absent ones.
    #[error("{kind} {key:?} not found")]
    NotFound { kind: ResourceKind, key: String },
    /// The request conflicts with the current state (409), e.g. a duplicate
    /// name or deleting something still in use.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// Well-formed, but cannot be carried out as asked (422), e.g. an image
    /// file that is not a disk image.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// No host can take what was asked for (409 `no_host_available`).
    /// `details` is the scheduler's explanation (which filters eliminated
    /// how many hosts, and the closest near-misses), as JSON.
    #[error("{message}")]
    NoCapacity {
        message: String,
        details: serde_json::Value,
    },
    /// A dependency is briefly unavailable; retrying may succeed (503).
    #[error("{message}")]
    Unavailable { message: String },
    /// A bug or an environment failure. The message is logged, never shown.
    #[error("internal error: {internal}")]
    Internal { internal: String },
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field: None,
            message: message.into(),
        }
    }

    pub fn not_found(kind: ResourceKind, key: impl fmt::Display) -> Self {
        Error::NotFound {
            kind,
            key: key.to_string(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Error::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Error::Unprocessable {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::Forbidden {
            message: message.into(),
        }
    }

    pub fn internal(context: impl fmt::Display) -> Self {
        Error::Internal {
            internal: context.to_string(),
        }
    }

    /// Wraps any error with a short statement of what was being done, keeping
    /// the whole source chain for the log.
    pub fn internal_from(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut msg = context.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            msg.push_str(": ");
            msg.push_str(&e.to_string());
            cur = e.source();
        }
        Error::Internal { internal: msg }
    }

    /// The machine-readable code clients switch on.
    pub fn error_code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } => "invalid_request",
            Error::Unauthenticated { .. } => "unauthenticated",
            Error::Forbidden { .. } => "forbidden",
            Error::NotFound { .. } => "not_found",
            Error::Conflict { code, .. } => code,
            Error::Unprocessable { code, .. } => code,
            Error::NoCapacity { .. } => "no_host_available",
            Error::Unavailable { .. } => "unavailable",
            Error::Internal { .. } => "internal",
        }
    }

    /// The HTTP status for this error. Kept here, next to the variants, so
    /// adding a variant forces a decision; `controller::http::error` is the
    /// only caller.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidRequest { .. } => 400,
            Error::Unauthenticated { .. } => 401,
            Error::Forbidden { .. } => 403,
            Error::NotFound { .. } => 404,
            Error::Conflict { .. } => 409,
            Error::Unprocessable { .. } => 422,
            Error::NoCapacity { .. } => 409,
            Error::Unavailable { .. } => 503,
            Error::Internal { .. } => 500,
        }
    }

    /// What the client is told. Internal details stay in the log.
    pub fn external_message(&self) -> String {
        match self {
            Error::Internal { .. } => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}
