//! The controller's side of the agent protocol (see
//! `stratus_api_types::agent` for the exchange as a whole).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_api_types::agent::{
    AgentDesired, AgentEnroll, AgentEnrolled, AgentReport, AgentReportAck, AgentRequest,
    AgentRequestKind, AgentRequestResult, ConsoleAppend, DesiredImage, DesiredQuery, DesiredVm,
    ImagePart, MigrationRole, OrphanAction, OrphanReport, PoolAssignment,
};
use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, ImageId, ResourceKind, VmId};
use stratus_datastore::model::HostRecord;
use stratus_datastore::NewHost;

use crate::app::{secrets, App};

/// The marker every host credential starts with.
pub const HOST_MARKER: &str = "stratus-host_";
const MAX_WAIT_SECS: u32 = 60;

/// An authenticated host agent.
#[derive(Debug, Clone)]
pub struct HostActor {
    pub host: HostRecord,
}

pub async fn agent_enroll(app: &App, p: AgentEnroll) -> Result<AgentEnrolled, Error> {
    let zone = p.zone.unwrap_or_else(|| "default".into());
    let cluster = p.cluster.unwrap_or_else(|| "default".into());
    for (field, v) in [("zone", &zone), ("cluster", &cluster)] {
        if v.is_empty() || v.len() > 63 {
            return Err(Error::invalid(
                field,
                format!("{field} must be 1-63 characters"),
            ));
        }
    }
    let tags = valid_tags(&p.tags)?;
    let credential = secrets::generate(HOST_MARKER);
    let host = app
        .ds
        .host_enroll(
            &secrets::hash(&p.enroll_token),
            &NewHost {
                name: p.name.as_str(),
                zone: &zone,
                cluster: &cluster,
                address: &p.address,
                facts: &p.facts,
                tags: &tags,
                credential_hash: &credential.hash,
            },
        )
        .await?;
    app.scheduler.host_changed(&host);
    tracing::info!(host = %host.id, name = %host.name, "host enrolled");
    Ok(AgentEnrolled {
        host_id: host.id,
        credential: credential.plaintext,
    })
}

pub async fn agent_report(
    app: &App,
    actor: &HostActor,
    r: AgentReport,
) -> Result<AgentReportAck, Error> {
    let h = &actor.host;
    let facts_changed = h.cpus != r.facts.cpus
        || h.memory_bytes != r.facts.memory_bytes
        || h.disk_bytes != r.facts.disk_bytes
        || h.qemu_version != r.facts.qemu_version
        || h.accel != r.facts.accel
        || h.driver.as_deref() != Some(r.facts.driver.as_str())
        || h.migration_tls != r.facts.migration_tls;
    let host = if facts_changed || h.state == stratus_api_types::views::HostState::Unreachable {
        let host = app.ds.host_heartbeat(h.id, &r.facts).await?;
        app.scheduler.host_changed(&host);
        host
    } else {
        // The common case: only liveness. Written with every other host's
        // heartbeat of the moment, in one statement (see `spawn_heartbeats`).
        app.heartbeats.heard(h.id);
        h.clone()
    };
    let known = app.ds.host_observed_generations(host.id).await?;
    let mut stale = 0;
    for obs in &r.vms {
        let newer = known
            .get(&obs.vm_id)
            .is_none_or(|g| i64::try_from(obs.generation).unwrap_or(i64::MAX) > *g);
        if newer && app.ds.vm_apply_observation(host.id, obs).await? {
            app.signals.vm_observed(obs.vm_id);
        } else {
            stale += 1;
        }
    }
    if stale < r.vms.len() as u32 {
        app.signals.observed_changed();
    }
    record_orphans(app, &host, &r.orphans).await?;
    if let Some(pools) = &r.pools {
        if app.ds.host_report_pools(host.id, pools).await? {
            // The pools it sees are placement constraints: the index
            // follows at once.
            let fresh = app.ds.host_get(host.id).await?;
            tracing::info!(host = %host.id, name = %host.name, pools = ?fresh.pools, "host's usable storage pools changed");
            app.scheduler.host_changed(&fresh);
        }
    }
    Ok(AgentReportAck {
        host_id: host.id,
        host_state: host.state,
        stale,
        pools: app.pools.assignments(app).await?,
    })
}

/// Most orphans recorded from one report: a host with more has a problem
/// the first thousand show well enough.
const MAX_ORPHANS_PER_REPORT: usize = 1000;

/// Records the orphans a host reported (nothing to write when there are
/// none, the common case), and logs the ones not seen before.
async fn record_orphans(
    app: &App,
    host: &HostRecord,
    orphans: &[OrphanReport],
) -> Result<(), Error> {
    if orphans.is_empty() {
        return Ok(());
    }
    if orphans.len() > MAX_ORPHANS_PER_REPORT {
        tracing::warn!(host = %host.id, name = %host.name, orphans = orphans.len(), kept = MAX_ORPHANS_PER_REPORT, "host reports more orphan VMs than are recorded");
    }
    let list: Vec<(VmId, OrphanAction)> = orphans
        .iter()
        .take(MAX_ORPHANS_PER_REPORT)
        .map(|o| (o.vm_id, o.action))
        .collect();
    let new = app
        .ds
        .host_orphans_seen(host.id, &list, stratus_common::time::now_micros())
        .await?;
    for vm in new {
        let action = list.iter().find(|o| o.0 == vm).map(|o| o.1);
        tracing::warn!(host = %host.id, name = %host.name, %vm, ?action, "host has a VM the controller does not place there (an orphan)");
    }
    Ok(())
}

/// The host's desired state; with `wait_secs`, waits (long poll) until its
/// revision is newer than `since`.
pub async fn agent_desired(
    app: &App,
    actor: &HostActor,
    q: DesiredQuery,
) -> Result<AgentDesired, Error> {
    let wait = q.wait_secs.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(Error::invalid(
            "wait_secs",
            format!("wait_secs must be at most {MAX_WAIT_SECS}"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(wait));
    // Woken when this host's desired state changes: at once for changes made
    // through this controller, within a second (the revision watch) for
    // changes made through others. Subscribed before the revision is read,
    // so a change in between is not missed.
    let mut changed = app.signals.watch_host(actor.host.id);
    let mut rev =
        u64::try_from(app.ds.host_get(actor.host.id).await?.desired_revision).unwrap_or(0);
    loop {
        if q.since.is_none_or(|s| rev > s) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        changed.borrow_and_update();
        let host = app.ds.host_get(actor.host.id).await?;
        rev = u64::try_from(host.desired_revision).unwrap_or(0);
    }
    let (revision, placed) = app.ds.host_desired(actor.host.id).await?;
    let here = actor.host.id;
    // A VM migrating here has its disk in the pool it moves to.
    let pool_of = |vm: &stratus_datastore::model::VmRecord| {
        if vm.migration_target == Some(here) {
            vm.migration_pool
        } else {
            vm.pool_id
        }
    };
    let mut pools = if placed.iter().any(|(vm, _)| pool_of(vm).is_some()) {
        app.pools.assignments(app).await?
    } else {
        vec![]
    };
    let missing = |pools: &[PoolAssignment]| {
        placed
            .iter()
            .filter_map(|(vm, _)| pool_of(vm))
            .any(|id| !pools.iter().any(|p| p.id == id))
    };
    if missing(&pools) {
        // A pool younger than the cache: read it again.
        app.pools.invalidate();
        pools = app.pools.assignments(app).await?;
    }
    let mut vms = Vec::with_capacity(placed.len());
    for (vm, img) in placed {
        let (Some(format), Some(sha256), Some(file_size)) =
            (img.format, img.sha256.clone(), img.file_size)
        else {
            continue;
        };
        let pool = match pool_of(&vm) {
            // Never sent without its pool: the host would make the disk in
            // its own directory instead.
            Some(id) => match pools.iter().find(|p| p.id == id) {
                Some(p) => Some(p.clone()),
                None => continue,
            },
            None => None,
        };
        vms.push(DesiredVm {
            vm_id: vm.id,
            name: vm.name,
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            disk_bytes: vm.disk_bytes,
            image: DesiredImage {
                id: img.id,
                format,
                sha256,
                file_size,
                kernel_sha256: img.kernel_sha256,
                initrd_sha256: img.initrd_sha256,
                cmdline: img.cmdline,
            },
            desired_state: vm.desired_state,
            reboot_generation: u64::try_from(vm.reboot_generation).unwrap_or(0),
            generation: u64::try_from(vm.generation).unwrap_or(0),
            restore_volumes: match &vm.restore_from {
                // Only a VM restored from a backup can have any.
                Some(_) => app
                    .ds
                    .backup_restored_volumes_of_vm(vm.id)
                    .await?
                    .into_iter()
                    .map(|v| stratus_api_types::agent::RestoreVolume {
                        volume_id: v.id.as_uuid(),
                        size_bytes: v.size_bytes,
                        file: v.file,
                    })
                    .collect(),
                None => Vec::new(),
            },
            restore_from: vm.restore_from.clone(),
            pool,
            migration: match vm.migration_target {
                Some(t) if t == here => Some(MigrationRole::Incoming),
                Some(_) => Some(MigrationRole::Outgoing),
                None => None,
            },
        });
    }
    let requests = app
        .ds
        .host_requests_pending(actor.host.id)
        .await?
        .into_iter()
        .filter_map(|r| {
            let kind: AgentRequestKind = serde_json::from_value(r.payload).ok()?;
            Some(AgentRequest {
                id: r.id,
                request: kind,
            })
        })
        .collect();
    Ok(AgentDesired {
        host_id: actor.host.id,
        revision: u64::try_from(revision).unwrap_or(0),
        vms,
        requests,
    })
}

pub async fn agent_request_result(
    app: &App,
    actor: &HostActor,
    id: &str,
    r: AgentRequestResult,
) -> Result<(), Error> {
    let id =
        uuid::Uuid::parse_str(id).map_err(|_| Error::invalid("request", "not a request id"))?;
    // The whole answer is kept (an exec's output, a backup's outcome, ...);
    // whoever waits on the request reads its part.
    let result = (r.error.is_none())
        .then(|| serde_json::to_value(&r))
        .transpose()
        .map_err(|e| Error::internal(format!("encoding a request's result: {e}")))?;
    app.ds
        .host_request_answer(id, actor.host.id, result.as_ref(), r.error.as_deref())
        .await?;
    // The step waiting on it reads it at once (a migration's end is on the
    // clock of its downtime budget), not at its next poll.
    app.signals.observed_changed();
    Ok(())
}

/// A long request's progress, from its host.
pub async fn agent_request_progress(
    app: &App,
    actor: &HostActor,
    id: &str,
    p: stratus_api_types::agent::RequestProgress,
) -> Result<(), Error> {
    let id =
        uuid::Uuid::parse_str(id).map_err(|_| Error::invalid("request", "not a request id"))?;
    app.ds
        .host_request_progress(
            id,
            actor.host.id,
            p.done_bytes,
            p.total_bytes,
            p.message.as_deref(),
        )
        .await
}

/// Only VMs placed on the calling host accept its console output.
pub async fn agent_console_append(
    app: &App,
    actor: &HostActor,
    vm: &str,
    c: ConsoleAppend,
) -> Result<(), Error> {
    let vm_id: VmId = vm
        .parse()
        .map_err(|_| Error::invalid("vm", "not a VM id"))?;
    let rec = app.ds.vm_get(vm_id).await?;
    if rec.host_id != Some(actor.host.id) {
        return Err(Error::not_found(ResourceKind::Vm, vm));
    }
    let data = STANDARD
        .decode(&c.data_base64)
        .map_err(|_| Error::invalid("data_base64", "not valid base64"))?;
    if data.len() > 1 << 20 {
        return Err(Error::invalid("data_base64", "at most 1 MiB per append"));
    }
    app.ds.vm_console_append(vm_id, c.offset, &data).await
}

/// Which file to send a host for an image part. Hosts may fetch images of
/// VMs placed on them, and public images.
pub async fn agent_image_file(
    app: &App,
    actor: &HostActor,
    image: &str,
    part: ImagePart,
) -> Result<std::path::PathBuf, Error> {
    let id: ImageId = image
        .parse()
        .map_err(|_| Error::invalid("image", "not an image id"))?;
    let img = app.ds.image_get(id).await?;
    let on_host = app.ds.host_uses_image(actor.host.id, id).await?;
    if !on_host && img.visibility != stratus_api_types::views::ImageVisibility::Public {
        return Err(Error::not_found(ResourceKind::Image, image));
    }
    let path = app.images.part_path(id, part);
    if !path.exists() {
        return Err(Error::not_found(
            ResourceKind::Image,
            format!("{image} ({part:?})"),
        ));
    }
    Ok(path)
}

pub async fn host_from_credential(app: &App, credential: &str) -> Result<Option<HostActor>, Error> {
    if !credential.starts_with(HOST_MARKER) {
        return Ok(None);
    }
    Ok(app
        .ds
        .host_by_credential(&secrets::hash(credential))
        .await?
        .map(|host| HostActor { host }))
}

/// Tags must be valid names (lowercase DNS labels), at most
/// [`super::MAX_TAGS`] per host.
fn valid_tags(tags: &[String]) -> Result<Vec<String>, Error> {
    if tags.len() > super::MAX_TAGS {
        return Err(Error::invalid(
            "tags",
            format!("a host has at most {} tags", super::MAX_TAGS),
        ));
    }
    tags.iter()
        .map(|t| {
            t.parse::<stratus_common::Name>()
                .map(|n| n.as_str().to_string())
                .map_err(|e| Error::invalid("tags", format!("tag {t:?}: {e}")))
        })
        .collect()
}

/// How far back the revision watch looks on its incremental reads.
const REVISION_WINDOW_MICROS: i64 = 10_000_000;
/// How often the revision watch reads every host's revision.
const FULL_REVISION_READ: Duration = Duration::from_secs(30);

/// Watches every host's desired revision in the store and wakes the long
/// polls of hosts whose revision grew: how agents polling this controller
/// hear of changes made through other controllers (within `every`), and of
/// changes made here by code that did not know the host (at once).
pub fn spawn_revision_watch(
    app: std::sync::Arc<App>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<stratus_common::HostId, i64> =
            std::collections::HashMap::new();
        let mut nudged = app.signals.watch_desired();
        // Most reads look only at hosts changed in the last few seconds (a
        // window wide enough for a transaction committing late and for
        // clocks differing between controllers); every 30 s all hosts are
        // read, as a backstop.
        let mut last_full = tokio::time::Instant::now();
        let mut first = true;
        loop {
            let since = if first || last_full.elapsed() > FULL_REVISION_READ {
                last_full = tokio::time::Instant::now();
                first = false;
                0
            } else {
                stratus_common::time::now_micros() - REVISION_WINDOW_MICROS
            };
            match app.ds.host_revisions(since).await {
                Ok(revs) => {
                    for (host, rev) in revs {
                        let old = seen.insert(host, rev);
                        // A host first seen here may have a poll waiting on
                        // it: a wake-up it does not need costs one read.
                        if old.is_none_or(|o| o < rev) {
                            app.signals.host_desired_changed(host);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read hosts' desired revisions"),
            }
            tokio::select! {
                _ = nudged.changed() => {
                    // Coalesce a burst of nudges into one read.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    nudged.borrow_and_update();
                }
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// Hosts heard from since the last flush.
#[derive(Debug, Default)]
pub struct HeartbeatBook {
    heard: std::sync::Mutex<std::collections::HashSet<stratus_common::HostId>>,
}

impl HeartbeatBook {
    pub fn heard(&self, host: stratus_common::HostId) {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host);
    }

    fn take(&self) -> Vec<stratus_common::HostId> {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }
}

/// Writes the heartbeats heard every `every`: 10,000 hosts reporting every
/// 10 s are 1,000 heartbeats a second, which as one write each would take
/// most of a SQLite controller's writer; as one statement a second they
/// cost nothing. (A host is marked unreachable only after 20 s of silence,
/// so a second's delay in recording liveness changes nothing.)
pub fn spawn_heartbeats(app: std::sync::Arc<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let heard = app.heartbeats.take();
            if heard.is_empty() {
                continue;
            }
            if let Err(e) = app
                .ds
                .hosts_heard(&heard, stratus_common::time::now_micros())
                .await
            {
                tracing::warn!(error = %e, hosts = heard.len(), "could not record heartbeats");
            }
        }
    })
}

/// Hands `host` one request and waits for its answer (at most `timeout`,
/// then the request is withdrawn); the host's error is `422 host_failed`
/// with its words.
pub(crate) async fn host_request(
    app: &App,
    host: HostId,
    vm: Option<VmId>,
    kind: &str,
    request: &AgentRequestKind,
    timeout: Duration,
) -> Result<AgentRequestResult, Error> {
    let payload = serde_json::to_value(request)
        .map_err(|e| Error::internal(format!("encoding a request: {e}")))?;
    let expires = now_micros() + i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    let id = app
        .ds
        .host_request_create(host, vm, kind, &payload, expires)
        .await?;
    app.signals.host_desired_changed(host);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = app.ds.host_request_get(id).await?;
        if r.answered_at.is_some() {
            if let Some(e) = r.error {
                return Err(Error::unprocessable("host_failed", e));
            }
            return r
                .result
                .and_then(|v| serde_json::from_value(v).ok())
                .ok_or_else(|| Error::internal("the host's answer could not be read"));
        }
        if tokio::time::Instant::now() >= deadline {
            app.ds.host_request_withdraw(id).await?;
            return Err(Error::Unavailable {
                message: format!("the host did not finish the {kind} in time"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
