//! The controllers an agent talks to: one URL, or several controllers
//! sharing one database (`--url http://a:8480,http://b:8480`), any of which
//! can serve any host.
//!
//! Every call goes to the *current* controller. A call that finds it
//! unreachable, too slow, or answering 5xx moves the whole set on to the
//! next URL (round robin) and is tried there after a short backoff
//! (100 ms doubling to 2 s, jittered), each controller at most once per
//! call; what is still failing then goes back to the caller, whose own loop
//! backs off as it always has. With a single URL nothing is retried here, so
//! one controller behaves exactly as before.
//!
//! ```text
//!   call ──► current (A) ──ok──► answer (the end of an outage is logged once)
//!               │ unreachable / timeout / 5xx
//!               ▼
//!   switch A → B (compare-and-swap: of many calls failing on A at once,
//!               │ one moves the set and logs it; the others just follow)
//!               ▼  backoff 100 ms … 2 s
//!            retry on B ── … at most once per controller, then the error
//!                           goes to the caller
//! ```
//!
//! A simulated fleet shares one set across its hosts (see `fleet.rs`), so a
//! dead controller costs one switch and one log line, not one per host.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{chain, AgentError, ApiError};

/// The controllers' URLs and which one calls go to now. Shared (`Arc`) by
/// every host of one process.
pub(crate) struct Controllers {
    /// Without trailing `/`; never empty.
    urls: Vec<Arc<str>>,
    current: AtomicUsize,
    /// Some call failed over and none has succeeded since.
    outage: AtomicBool,
}

impl Controllers {
    /// Parses `list`: one URL, or several separated by commas (spaces
    /// around them are ignored). Each must be an `http` or `https` URL.
    pub fn parse(list: &str) -> Result<Controllers, AgentError> {
        let urls = parse_urls(list)?;
        Ok(Controllers {
            urls: urls.into_iter().map(Arc::from).collect(),
            current: AtomicUsize::new(0),
            outage: AtomicBool::new(false),
        })
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// The controller calls go to now: its index (to name it when failing
    /// over) and its URL.
    pub fn current(&self) -> (usize, Arc<str>) {
        let i = self.current.load(Ordering::Acquire) % self.urls.len();
        (i, self.urls[i].clone())
    }

    /// A call to controller `failed` did not work out (`why`): moves the set
    /// on to the next controller, unless another call already has. Returns
    /// the index moved to when this call made the switch.
    pub fn fail_over(&self, failed: usize, why: &ApiError) -> Option<usize> {
        let n = self.urls.len();
        if n < 2 {
            return None;
        }
        let next = (failed + 1) % n;
        self.current
            .compare_exchange(failed, next, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let first = !self.outage.swap(true, Ordering::AcqRel);
        let (from, to) = (&self.urls[failed], &self.urls[next]);
        // One line per outage at warn (however many hosts share the set);
        // further switches before any call succeeds again at debug.
        if first {
            tracing::warn!(from = %from, to = %to, error = %chain(why), "controller failed; switching to the next one");
        } else {
            tracing::debug!(from = %from, to = %to, error = %chain(why), "controller failed too; switching again");
        }
        Some(next)
    }

    /// A call succeeded: ends an outage (and says which controller answers).
    pub fn succeeded(&self, index: usize) {
        if self.outage.load(Ordering::Relaxed) && self.outage.swap(false, Ordering::AcqRel) {
            tracing::info!(url = %self.urls[index % self.urls.len()], "calls to the controllers succeed again");
        }
    }
}

impl fmt::Debug for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controllers")
            .field("urls", &self.urls)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// The URLs of a controller list, validated, without trailing `/`.
pub(crate) fn parse_urls(list: &str) -> Result<Vec<String>, AgentError> {
    let bad = |url: &str, reason: &str| AgentError::ControllerUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let mut urls = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad(list, "empty entry in the list of controllers"));
        }
        let parsed = reqwest::Url::parse(part).map_err(|e| bad(part, &e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad(part, "the scheme must be http or https"));
        }
        if parsed.host_str().is_none() {
            return Err(bad(part, "no host"));
        }
        urls.push(part.trim_end_matches('/').to_string());
    }
    Ok(urls)
}

/// Whether two controller lists name the same controllers in the same order.
pub(crate) fn same_list(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .collect()
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn down() -> ApiError {
        ApiError::Timeout(Duration::from_secs(1))
    }

    #[test]
    fn a_list_parses_and_bad_entries_are_named() {
        assert_eq!(
            parse_urls("http://a:1").expect("one"),
            ["http://a:1".to_string()]
        );
        assert_eq!(
            parse_urls(" http://a:1/ , https://b:2 ").expect("two"),
            ["http://a:1".to_string(), "https://b:2".to_string()]
        );
        for bad in [
            "",
            "http://a:1,,http://b:2",
            "http://a:1,",
            "a:1",
            "ftp://a",
        ] {
            let e = parse_urls(bad).expect_err(bad);
            assert!(matches!(e, AgentError::ControllerUrl { .. }), "{bad}: {e}");
        }
        let e = parse_urls("http://a:1,ftp://b").expect_err("ftp");
        assert!(e.to_string().contains("ftp://b"), "{e}");
        assert!(same_list(
            "http://a:1/,http://b:2",
            "http://a:1, http://b:2/"
        ));
        assert!(!same_list("http://a:1,http://b:2", "http://b:2,http://a:1"));
    }

    #[test]
    fn failing_over_goes_round_robin_once_per_failure() {
        let c = Controllers::parse("http://a:1,http://b:2,http://c:3").expect("parse");
        assert_eq!(c.current(), (0, Arc::from("http://a:1")));
        assert_eq!(c.fail_over(0, &down()), Some(1));
        assert_eq!(c.current().1.as_ref(), "http://b:2");
        // Another call that failed on a too (in flight before the switch)
        // does not move the set again: b is not skipped.
        assert_eq!(c.fail_over(0, &down()), None);
        assert_eq!(c.current().0, 1);
        assert_eq!(c.fail_over(1, &down()), Some(2));
        assert_eq!(c.fail_over(2, &down()), Some(0), "wraps around");
        assert_eq!(c.current().1.as_ref(), "http://a:1");
        c.succeeded(0);
        assert!(!c.outage.load(Ordering::Relaxed));
    }

    #[test]
    fn a_single_controller_never_switches() {
        let c = Controllers::parse("http://a:1").expect("parse");
        assert_eq!(c.fail_over(0, &down()), None);
        assert_eq!(c.current(), (0, Arc::from("http://a:1")));
        assert_eq!(c.len(), 1);
    }
}
