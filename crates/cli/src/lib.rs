//! The client commands of `stratus`: `project`, `token`, `host`, `image`,
//! `flavor`, `vm`, `job`.
//!
//! Every command talks to the API through the generated client
//! (`stratus-client`); nothing here builds HTTP requests by hand. Where to
//! connect and with which token comes from flags, then `STRATUS_URL` /
//! `STRATUS_TOKEN`, then the config file `stratus up` writes
//! ([`config`]).

pub mod backups;
pub mod commands;
pub mod config;
pub mod migrate;
pub mod output;
pub mod pools;
pub mod scheduling;
pub mod snapshots;
pub mod volumes;
mod wait;

pub use commands::{run, ClientCommand, GlobalOpts};

/// How a client command failed; `main` prints it and picks the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API refused the request.
    #[error("{message} ({code}{})", request_id.as_deref().map(|r| format!(", request {r}")).unwrap_or_default())]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// A job ended without succeeding.
    #[error("job {id} {state}: {message}")]
    JobFailed {
        id: String,
        state: String,
        message: String,
    },
    #[error("cannot reach the Stratus API at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{0}")]
    Usage(String),
    /// A command run in a VM exited non-zero; the CLI exits with its code.
    #[error("the command exited with status {0}")]
    Exit(i32),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// Exit status: 1 for refusals and failed jobs, 2 for usage errors, 3
    /// when the API could not be reached.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Exit(code) => *code,
            CliError::Usage(_) => 2,
            CliError::Connect { .. } => 3,
            _ => 1,
        }
    }
}

impl From<stratus_client::Error<stratus_client::types::ErrorBody>> for CliError {
    fn from(e: stratus_client::Error<stratus_client::types::ErrorBody>) -> Self {
        use stratus_client::Error as E;
        match e {
            E::ErrorResponse(r) => {
                let status = r.status().as_u16();
                let body = r.into_inner();
                CliError::Api {
                    status,
                    code: body.error_code,
                    message: body.message,
                    request_id: Some(body.request_id),
                }
            }
            E::CommunicationError(re) => CliError::Connect {
                url: re.url().map(|u| u.to_string()).unwrap_or_default(),
                detail: error_chain(&re),
            },
            E::InvalidRequest(m) => CliError::Usage(m),
            E::UnexpectedResponse(r) => CliError::Api {
                status: r.status().as_u16(),
                code: "unexpected_response".into(),
                message: format!("the server answered {} unexpectedly", r.status()),
                request_id: r
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            },
            other => CliError::Other(anyhow::anyhow!("{other}")),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
