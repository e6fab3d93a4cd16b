//! The agent's side of the agent protocol: every call to the controller,
//! through the generated client, each bounded in time so a hung connection
//! never wedges a loop.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_client::types::{
    AgentDesired, AgentEnroll, AgentEnrolled, AgentReport, AgentReportAck, AgentRequestResult,
    ConsoleAppend, ImagePart,
};
use stratus_client::{ByteStream, Client};
use stratus_common::{ImageId, VmId};

use crate::error::{AgentError, ApiError};

/// How long an ordinary call (report, console, result) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the controller may take beyond the long poll's own wait.
const POLL_SLACK: Duration = Duration::from_secs(15);

/// The controller, as this agent talks to it.
#[derive(Clone)]
pub(crate) struct Api {
    client: Client,
}

impl Api {
    /// A client for `url`; with a credential, every request carries it as a
    /// bearer token. No overall request timeout (image downloads are long);
    /// each call bounds itself instead.
    pub fn new(url: &str, credential: Option<&str>) -> Result<Api, AgentError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(c) = credential {
            let v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", c.trim()))
                .map_err(|_| AgentError::BadCredential)?;
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("stratus-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AgentError::Http)?;
        Ok(Api {
            client: Client::new_with_client(url.trim_end_matches('/'), http),
        })
    }

    pub async fn enroll(&self, body: AgentEnroll) -> Result<AgentEnrolled, ApiError> {
        bounded(CALL_TIMEOUT, self.client.agent_enroll().body(body).send()).await
    }

    /// The host's desired state, waiting up to `wait` for a revision newer
    /// than `since`.
    pub async fn desired(
        &self,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<AgentDesired, ApiError> {
        let secs = u32::try_from(wait.as_secs()).unwrap_or(60).min(60);
        let mut call = self.client.agent_desired().wait_secs(secs);
        if let Some(s) = since {
            call = call.since(s);
        }
        bounded(wait + POLL_SLACK, call.send()).await
    }

    pub async fn report(&self, report: AgentReport) -> Result<AgentReportAck, ApiError> {
        bounded(CALL_TIMEOUT, self.client.agent_report().body(report).send()).await
    }

    pub async fn console_append(&self, vm: VmId, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let body = ConsoleAppend {
            offset,
            data_base64: STANDARD.encode(data),
        };
        bounded(
            CALL_TIMEOUT,
            self.client
                .agent_console_append()
                .vm(vm.to_string())
                .body(body)
                .send(),
        )
        .await
    }

    pub async fn request_result(
        &self,
        id: uuid::Uuid,
        result: AgentRequestResult,
    ) -> Result<(), ApiError> {
        bounded(
            CALL_TIMEOUT,
            self.client
                .agent_request_result()
                .request(id.to_string())
                .body(result)
                .send(),
        )
        .await
    }

    /// Starts downloading an image part; the caller reads the stream (and
    /// bounds each chunk in time).
    pub async fn image_download(
        &self,
        image: ImageId,
        part: ImagePart,
    ) -> Result<ByteStream, ApiError> {
        bounded(
            CALL_TIMEOUT,
            self.client
                .agent_image_download()
                .image(image.to_string())
                .part(part)
                .send(),
        )
        .await
    }
}

/// Runs a client call with a time bound and unwraps its answer.
async fn bounded<T, F>(limit: Duration, call: F) -> Result<T, ApiError>
where
    F: std::future::Future<
        Output = Result<
            stratus_client::ResponseValue<T>,
            stratus_client::Error<stratus_client::types::ErrorBody>,
        >,
    >,
{
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v.into_inner()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::Timeout(limit)),
    }
}
