//! `--wait`: follow a job to its end with a progress bar.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use stratus_client::types::{Job, JobState};
use stratus_client::Client;

use crate::output::wire;
use crate::CliError;

/// Polls the job until it ends. Returns it if it succeeded; a failed or
/// cancelled job is an error carrying the job's own message.
pub async fn wait_for_job(client: &Client, id: &str, show_progress: bool) -> Result<Job, CliError> {
    let bar = if show_progress {
        let b = ProgressBar::new(100);
        b.set_draw_target(ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let job = loop {
        // Long-poll: the server answers when the job ends or after 1 s, so
        // the bar moves and the wait ends promptly.
        let job = client
            .job_wait()
            .job(id)
            .timeout_secs(1u32)
            .send()
            .await?
            .into_inner();
        if let Some(b) = &bar {
            b.set_position(job.progress.clamp(0, 100) as u64);
            b.set_message(format!(
                "{} {}",
                job.kind,
                job.current_step.clone().unwrap_or_else(|| wire(&job.state))
            ));
        }
        if matches!(
            job.state,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        ) {
            break job;
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match job.state {
        JobState::Succeeded => Ok(job),
        _ => Err(CliError::JobFailed {
            id: job.id.to_string(),
            state: wire(&job.state),
            message: job
                .error
                .as_ref()
                .map(|e| format!("{} ({})", e.message, e.code))
                .unwrap_or_else(|| "no reason given".into()),
        }),
    }
}
