//! The agent's side of the agent protocol: every call to the controller,
//! each bounded in time so a hung connection never wedges a loop.
//!
//! The bodies are the generated client's types (`stratus_client::types`),
//! but the requests are built here rather than by the generated `Client`:
//! that one carries its credential in its `reqwest::Client`'s default
//! headers, so hosts with different credentials could not share a
//! connection pool. Built here, every simulated host of a fleet sends its
//! own bearer token over one `reqwest::Client` (one pool, see
//! `fleet.rs`), and a lone agent is just a fleet of one.
//!
//! A host may have several controllers to talk to; [`Api::call`] sends
//! each call to the current one and fails over to the next (see
//! `controllers.rs`).
//!
//! Answers are read as the generated client reads them: the documented
//! success status decodes the body, a 4xx or 5xx with an [`ErrorBody`] is
//! [`ApiError::Refused`], anything else [`ApiError::Unexpected`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use stratus_client::types::{
    AgentDesired, AgentEnroll, AgentEnrolled, AgentReport, AgentReportAck, AgentRequestResult,
    ConsoleAppend, ErrorBody, ImagePart,
};
use stratus_client::{ByteStream, ClientInfo};
use stratus_common::{ImageId, VmId};
use tokio::sync::Semaphore;

use crate::agent::Backoff;
use crate::controllers::Controllers;
use crate::error::{AgentError, ApiError};

/// How long an ordinary call (report, console, result) may take once it has
/// a call slot.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the controller may take beyond the long poll's own wait.
const POLL_SLACK: Duration = Duration::from_secs(15);
/// The backoff between tries of one call on successive controllers.
const FAILOVER_MIN: Duration = Duration::from_millis(100);
const FAILOVER_MAX: Duration = Duration::from_secs(2);

/// The controller, as one host talks to it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    /// Where calls go, and where they go when that fails (shared by every
    /// host of a fleet; see `controllers.rs`).
    controllers: Arc<Controllers>,
    /// `Bearer <credential>`, once enrolled.
    auth: Option<HeaderValue>,
    /// Bounds the short calls in flight across every host sharing it, so
    /// 10,000 simulated hosts starting at once queue here rather than open
    /// 10,000 connections. `None`: unbounded (a lone agent).
    limiter: Option<Arc<Semaphore>>,
}

/// The HTTP client an agent (or a whole fleet) talks to its controller
/// with. No overall request timeout (image downloads are long); each call
/// bounds itself instead.
pub(crate) fn http_client() -> Result<reqwest::Client, AgentError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .user_agent(concat!("stratus-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(AgentError::Http)
}

/// Whether a call waits for a call slot (see [`Api::call`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// A short call: waits for a slot if the hosts share a bound.
    Short,
    /// A long poll or a download: holds its connection for long, so it
    /// never takes a slot.
    Long,
}

impl Api {
    /// A host's view of the controllers over `http`; with a credential,
    /// every request carries it as a bearer token.
    pub fn new(
        http: reqwest::Client,
        controllers: Arc<Controllers>,
        credential: Option<&str>,
        limiter: Option<Arc<Semaphore>>,
    ) -> Result<Api, AgentError> {
        let auth = match credential {
            Some(c) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", c.trim()))
                    .map_err(|_| AgentError::BadCredential)?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Api {
            http,
            controllers,
            auth,
            limiter,
        })
    }

    fn request(&self, base: &str, method: Method, path: &str) -> RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{base}{path}"))
            .header(ACCEPT, "application/json")
            .header(
                "api-version",
                <stratus_client::Client as ClientInfo<()>>::api_version(),
            );
        if let Some(auth) = &self.auth {
            r = r.header(AUTHORIZATION, auth.clone());
        }
        r
    }

    /// Makes one call: `build` makes the request for a controller's base
    /// URL, `answer` reads the response. The call goes to the current
    /// controller; if that one cannot be reached, times out or fails (5xx,
    /// see [`ApiError::is_failover`]), the controllers move on to the next
    /// and the call is tried there after a short backoff, each controller
    /// at most once (so a single controller is tried once, as a caller
    /// expects). Every agent call is safe to repeat: reports carry
    /// generations, console appends offsets, the others are reads or
    /// answers the controller takes once.
    ///
    /// A short call waits for a call slot (if limited), then gets `limit`
    /// from there. The wait for a slot is not counted: a call that timed
    /// out may still have been carried out, and retrying an enrollment
    /// that was would find the host's name taken; a slot is always freed
    /// within `limit` by the call holding it. The slot is not held during
    /// the backoff.
    async fn call<T, B, A, F>(
        &self,
        slot: Slot,
        limit: Duration,
        build: B,
        answer: A,
    ) -> Result<T, ApiError>
    where
        B: Fn(&str) -> RequestBuilder,
        A: Fn(Response, Bound) -> F,
        F: Future<Output = Result<T, ApiError>>,
    {
        let mut tried = 0;
        let mut backoff = Backoff::new(FAILOVER_MIN, FAILOVER_MAX);
        loop {
            let (index, base) = self.controllers.current();
            let result = async {
                let _slot = match (&self.limiter, slot) {
                    // The semaphore is never closed.
                    (Some(l), Slot::Short) => l.acquire().await.ok(),
                    _ => None,
                };
                let bound = Bound::new(limit);
                let resp = bound
                    .run(build(&base).send())
                    .await?
                    .map_err(ApiError::Unreachable)?;
                Ok::<_, ApiError>((resp, bound))
            }
            .await;
            let result = match result {
                Ok((resp, bound)) => answer(resp, bound).await,
                Err(e) => Err(e),
            };
            tried += 1;
            match result {
                Err(e) if e.is_failover() && tried < self.controllers.len() => {
                    self.controllers.fail_over(index, &e);
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(e),
                Ok(v) => {
                    self.controllers.succeeded(index);
                    return Ok(v);
                }
            }
        }
    }

    pub async fn enroll(&self, body: AgentEnroll) -> Result<AgentEnrolled, ApiError> {
        self.call(
            Slot::Short,
            CALL_TIMEOUT,
            |base| {
                self.request(base, Method::POST, "/v1/agent/enroll")
                    .json(&body)
            },
            |resp, bound| decode(resp, StatusCode::CREATED, bound),
        )
        .await
    }

    /// The host's desired state, waiting up to `wait` for a revision newer
    /// than `since`. Without `since` the controller answers at once, so
    /// that first poll takes a call slot like any short call.
    pub async fn desired(
        &self,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<AgentDesired, ApiError> {
        let secs = u32::try_from(wait.as_secs()).unwrap_or(60).min(60);
        let limit = Duration::from_secs(u64::from(secs)) + POLL_SLACK;
        let slot = if since.is_some() {
            Slot::Long
        } else {
            Slot::Short
        };
        self.call(
            slot,
            limit,
            |base| {
                let r = self
                    .request(base, Method::GET, "/v1/agent/desired")
                    .query(&[("wait_secs", secs)]);
                match since {
                    Some(s) => r.query(&[("since", s)]),
                    None => r,
                }
            },
            |resp, bound| decode(resp, StatusCode::OK, bound),
        )
        .await
    }

    pub async fn report(&self, report: AgentReport) -> Result<AgentReportAck, ApiError> {
        self.call(
            Slot::Short,
            CALL_TIMEOUT,
            |base| {
                self.request(base, Method::POST, "/v1/agent/report")
                    .json(&report)
            },
            |resp, bound| decode(resp, StatusCode::OK, bound),
        )
        .await
    }

    pub async fn console_append(&self, vm: VmId, offset: u64, data: &[u8]) -> Result<(), ApiError> {
        let body = ConsoleAppend {
            offset,
            data_base64: STANDARD.encode(data),
        };
        self.call(
            Slot::Short,
            CALL_TIMEOUT,
            |base| {
                self.request(base, Method::PUT, &format!("/v1/agent/vms/{vm}/console"))
                    .json(&body)
            },
            |resp, bound| empty(resp, StatusCode::NO_CONTENT, bound),
        )
        .await
    }

    pub async fn request_result(
        &self,
        id: uuid::Uuid,
        result: AgentRequestResult,
    ) -> Result<(), ApiError> {
        self.call(
            Slot::Short,
            CALL_TIMEOUT,
            |base| {
                self.request(
                    base,
                    Method::POST,
                    &format!("/v1/agent/requests/{id}/result"),
                )
                .json(&result)
            },
            |resp, bound| empty(resp, StatusCode::NO_CONTENT, bound),
        )
        .await
    }

    /// Reports how far a long request has come.
    pub async fn request_progress(
        &self,
        id: uuid::Uuid,
        progress: stratus_client::types::RequestProgress,
    ) -> Result<(), ApiError> {
        self.call(
            Slot::Short,
            CALL_TIMEOUT,
            |base| {
                self.request(
                    base,
                    Method::POST,
                    &format!("/v1/agent/requests/{id}/progress"),
                )
                .json(&progress)
            },
            |resp, bound| empty(resp, StatusCode::NO_CONTENT, bound),
        )
        .await
    }

    /// Starts downloading an image part; the caller reads the stream (and
    /// bounds each chunk in time). Takes no call slot: a download can be
    /// long, and slots are for short calls. A download that breaks off
    /// midway is the image cache's to retry, not this call's.
    pub async fn image_download(
        &self,
        image: ImageId,
        part: ImagePart,
    ) -> Result<ByteStream, ApiError> {
        self.call(
            Slot::Long,
            CALL_TIMEOUT,
            |base| {
                self.request(
                    base,
                    Method::GET,
                    &format!("/v1/agent/images/{image}/{part}"),
                )
            },
            |resp, bound| async move {
                if resp.status() == StatusCode::OK {
                    return Ok(ByteStream::new(Box::pin(resp.bytes_stream())));
                }
                Err(refusal(resp, bound).await)
            },
        )
        .await
    }
}

/// The body of an answer with status `ok`, else why not.
async fn decode<T: DeserializeOwned>(
    resp: Response,
    ok: StatusCode,
    bound: Bound,
) -> Result<T, ApiError> {
    if resp.status() != ok {
        return Err(refusal(resp, bound).await);
    }
    let bytes = bound
        .run(resp.bytes())
        .await?
        .map_err(ApiError::Unreachable)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Invalid(format!("the controller's answer could not be decoded: {e}"))
    })
}

/// Nothing but status `ok` expected.
async fn empty(resp: Response, ok: StatusCode, bound: Bound) -> Result<(), ApiError> {
    if resp.status() == ok {
        Ok(())
    } else {
        Err(refusal(resp, bound).await)
    }
}

/// An answer other than the expected one: the controller's own error
/// (4xx/5xx with an error body), or something the agent does not expect
/// (another status, or a body that is not the controller's, e.g. a
/// proxy's page).
async fn refusal(resp: Response, bound: Bound) -> ApiError {
    let status = resp.status().as_u16();
    if !(400..600).contains(&status) {
        return ApiError::Unexpected { status };
    }
    match bound.run(resp.bytes()).await {
        Ok(Ok(bytes)) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ApiError::Refused {
                status,
                code: e.error_code,
                message: e.message,
            },
            Err(_) => ApiError::Unexpected { status },
        },
        _ => ApiError::Unexpected { status },
    }
}

/// One call's time bound: a deadline for the whole call (queueing, head and
/// body), and the limit it came from, for the error.
#[derive(Clone, Copy, Debug)]
struct Bound {
    deadline: tokio::time::Instant,
    limit: Duration,
}

impl Bound {
    fn new(limit: Duration) -> Bound {
        Bound {
            deadline: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    async fn run<F: std::future::Future>(self, f: F) -> Result<F::Output, ApiError> {
        tokio::time::timeout_at(self.deadline, f)
            .await
            .map_err(|_| ApiError::Timeout(self.limit))
    }
}
