//! Jobs: listing, detail with the step log, waiting, cancelling.

use std::time::Duration;

use stratus_api_types::params::{JobFilter, JobWait, PageParams};
use stratus_api_types::views::{Job, JobPage};
use stratus_common::Error;
use stratus_datastore::{JobListFilter, PageRequest};

use crate::app::{lookup, Actor, App};

pub async fn job_list(
    app: &App,
    actor: &Actor,
    f: JobFilter,
    page: PageParams,
) -> Result<JobPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, f.project.as_deref()).await?;
    if let Some(k) = f.kind.as_deref() {
        k.parse::<stratus_jobs::JobKind>()
            .map_err(|m| Error::invalid("kind", m))?;
    }
    let filter = JobListFilter {
        project,
        state: f.state,
        kind: f.kind.as_deref(),
        target: f.target,
    };
    let p = app.ds.job_list(&filter, &page).await?;
    Ok(JobPage {
        items: p.items.into_iter().map(|r| r.into_view(vec![])).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn job_view(app: &App, actor: &Actor, key: &str) -> Result<Job, Error> {
    let job = lookup::job(app, actor, key).await?;
    let events = app.ds.job_events(job.id).await?;
    Ok(job.into_view(events))
}

/// Answers when the job has ended or `timeout_secs` passed, whichever is
/// first, with the job as it then stands.
pub async fn job_wait(app: &App, actor: &Actor, key: &str, w: JobWait) -> Result<Job, Error> {
    let secs = w.timeout_secs.unwrap_or(30);
    if secs > 300 {
        return Err(Error::invalid(
            "timeout_secs",
            format!("timeout_secs must be at most 300, got {secs}"),
        ));
    }
    let job = lookup::job(app, actor, key).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(secs));
    let mut current = job;
    while !current.state.is_terminal() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        current = app.ds.job_get(current.id).await?;
    }
    let events = app.ds.job_events(current.id).await?;
    Ok(current.into_view(events))
}

pub async fn job_cancel(app: &App, actor: &Actor, key: &str) -> Result<Job, Error> {
    let job = lookup::job(app, actor, key).await?;
    actor.require_mutate()?;
    let job = app.ds.job_request_cancel(job.id).await?;
    app.job_waker.notify_one();
    // A saga step waiting on the VM's host hears of it at once.
    if job.target_kind == "vm" {
        app.signals
            .vm_observed(stratus_common::VmId::from(job.target_id));
    }
    let events = app.ds.job_events(job.id).await?;
    Ok(job.into_view(events))
}
