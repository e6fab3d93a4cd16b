//! The agent's errors: starting up ([`AgentError`]), talking to the
//! controller ([`ApiError`]) and caching images ([`ImageError`]). Messages
//! say what failed; the cause is chained as the source, never repeated.

use std::path::PathBuf;
use std::time::Duration;

use stratus_client::types::{ErrorBody, ImagePart};
use stratus_common::ImageId;
use stratus_driver::DriverError;

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use the data directory {}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("another agent is running with the data directory {}", path.display())]
    DataDirInUse { path: PathBuf },

    #[error(
        "this host is not enrolled: {} does not exist and no enrollment token was given \
         (make one with `stratus host enroll-token` and pass it with --enroll-token)",
        path.display()
    )]
    NotEnrolled { path: PathBuf },

    #[error("cannot read the agent credential file {}", path.display())]
    CredentialRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the agent credential file {} is damaged (delete it and enroll again)", path.display())]
    CredentialParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot write the agent credential file {}", path.display())]
    CredentialWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{url:?} is not a controller URL: {reason} (pass one URL, or several separated by commas)"
    )]
    ControllerUrl { url: String, reason: String },

    #[error("{name:?} cannot be a host name: {reason} (pass another with --name)")]
    InvalidName { name: String, reason: String },

    #[error("enrolling with the controller at {url} failed")]
    Enroll {
        url: String,
        #[source]
        source: ApiError,
    },

    #[error("cannot start the {driver} driver")]
    Driver {
        driver: &'static str,
        #[source]
        source: DriverError,
    },

    #[error("cannot ask the driver about this host")]
    Facts(#[source] DriverError),

    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),

    #[error("the credential contains characters not allowed in an HTTP header")]
    BadCredential,

    #[error("a simulated fleet needs at least one host")]
    FleetSize,

    #[error(
        "{hosts} simulated hosts need more open files than this process may have \
         (limit {limit}; raise the hard limit, e.g. `ulimit -Hn`, or run fewer hosts)"
    )]
    OpenFilesLimit { hosts: usize, limit: u64 },

    #[error("simulated host {name} cannot start")]
    FleetHost {
        name: String,
        #[source]
        source: Box<AgentError>,
    },
}

/// A call to the controller that did not work out.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The controller answered with an error.
    #[error("the controller refused (HTTP {status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },

    #[error("the controller could not be reached")]
    Unreachable(#[source] reqwest::Error),

    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),

    #[error("the controller answered with HTTP {status}, which the agent does not expect")]
    Unexpected { status: u16 },

    #[error("the request could not be built: {0}")]
    Invalid(String),
}

impl ApiError {
    /// The HTTP status the controller answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Refused { status, .. } | ApiError::Unexpected { status } => Some(*status),
            _ => None,
        }
    }

    /// Whether another controller might do better: this one could not be
    /// reached, did not answer in time, or failed (5xx). What a controller
    /// refused (4xx) or an answer that cannot be read is not worth asking
    /// another.
    pub fn is_failover(&self) -> bool {
        match self {
            ApiError::Unreachable(_) | ApiError::Timeout(_) => true,
            ApiError::Refused { status, .. } | ApiError::Unexpected { status } => *status >= 500,
            ApiError::Invalid(_) => false,
        }
    }

    /// Whether the controller said this will never work (a 4xx other than
    /// 408/429), as opposed to a failure worth retrying.
    pub fn is_permanent(&self) -> bool {
        self.status()
            .is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429)
    }
}

impl From<stratus_client::Error<ErrorBody>> for ApiError {
    fn from(e: stratus_client::Error<ErrorBody>) -> Self {
        use stratus_client::Error as E;
        match e {
            E::ErrorResponse(rv) => ApiError::Refused {
                status: rv.status().as_u16(),
                code: rv.error_code.clone(),
                message: rv.message.clone(),
            },
            E::CommunicationError(e) | E::ResponseBodyError(e) | E::InvalidUpgrade(e) => {
                ApiError::Unreachable(e)
            }
            E::InvalidResponsePayload(_, e) => {
                ApiError::Invalid(format!("the controller's answer could not be decoded: {e}"))
            }
            E::UnexpectedResponse(r) => ApiError::Unexpected {
                status: r.status().as_u16(),
            },
            E::InvalidRequest(s) => ApiError::Invalid(s),
            E::Custom(s) => ApiError::Invalid(s),
        }
    }
}

/// Why an image could not be cached.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot download the {part} of image {image}")]
    Download {
        image: ImageId,
        part: ImagePart,
        #[source]
        source: ApiError,
    },

    #[error("the download of the {part} of image {image} broke off")]
    Stream {
        image: ImageId,
        part: ImagePart,
        #[source]
        source: reqwest::Error,
    },

    #[error("the download of the {part} of image {image} stalled for {stall:?}")]
    Stalled {
        image: ImageId,
        part: ImagePart,
        stall: Duration,
    },

    #[error(
        "the {part} of image {image} has SHA-256 {actual}, but the controller says {expected}"
    )]
    Checksum {
        image: ImageId,
        part: ImagePart,
        expected: String,
        actual: String,
    },

    #[error("the {part} of image {image} is {actual} bytes, but the controller says {expected}")]
    Size {
        image: ImageId,
        part: ImagePart,
        expected: u64,
        actual: u64,
    },

    #[error("cannot write the image cache ({})", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The error and its causes on one line, `outer: inner: innermost`: what an
/// operator sees as the reason of a failed VM.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // Some errors already print their source; don't say it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_causes_once() {
        let e = ImageError::Io {
            path: "/data/images/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(
            chain(&e),
            "cannot write the image cache (/data/images/x): denied"
        );
        let e = ApiError::Refused {
            status: 404,
            code: "not_found".into(),
            message: "no such image".into(),
        };
        assert!(e.is_permanent());
        assert!(!ApiError::Timeout(Duration::from_secs(1)).is_permanent());
        assert!(!ApiError::Unexpected { status: 503 }.is_permanent());
        assert!(ApiError::Unexpected { status: 503 }.is_failover());
        assert!(ApiError::Timeout(Duration::from_secs(1)).is_failover());
        assert!(!e.is_failover(), "a 404 is the same everywhere");
        assert!(!ApiError::Invalid("x".into()).is_failover());
    }
}
