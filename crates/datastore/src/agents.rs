//! What host agents write and read: enrollment, heartbeats and facts,
//! observed VM state (gated by generation), desired state, requests and
//! console output.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use stratus_api_types::agent::{HostFacts, ObservedVmState, VmObservation};
use stratus_api_types::views::VmState;
use stratus_common::time::now_micros;
use stratus_common::{Error, HostId, ResourceKind, VmId};

use crate::db::{db_error, is_unique_violation};
use crate::model::{enum_str, i64_of, HostRecord, ImageRecord, RowExt, VmRecord};
use crate::Datastore;

/// A request for an agent, as stored.
#[derive(Debug, Clone)]
pub struct HostRequestRecord {
    pub id: uuid::Uuid,
    pub host_id: HostId,
    pub kind: String,
    pub payload: serde_json::Value,
    pub answered_at: Option<i64>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// A long request's progress as the agent last reported it (done, total).
    pub progress: Option<(u64, u64)>,
    /// The host's words on that progress (a migration's phase and rates).
    pub progress_message: Option<String>,
}

/// Bytes of console output kept per VM.
pub const CONSOLE_KEEP: usize = 256 * 1024;

/// A host enrolling, as validated by the API.
#[derive(Debug, Clone)]
pub struct NewHost<'a> {
    pub name: &'a str,
    pub zone: &'a str,
    pub cluster: &'a str,
    pub address: &'a str,
    pub facts: &'a HostFacts,
    /// Valid tag names (duplicates and order do not matter).
    pub tags: &'a [String],
    pub credential_hash: &'a str,
}

impl Datastore {
    /// Enrolls a host with an enrollment token: records the host (and its
    /// cluster, with default policy, if new) and spends one use of the token,
    /// in one transaction.
    pub async fn host_enroll(
        &self,
        token_hash: &str,
        h: &NewHost<'_>,
    ) -> Result<HostRecord, Error> {
        let NewHost {
            name,
            zone,
            cluster,
            address,
            facts,
            tags,
            credential_hash,
        } = *h;
        let ctx = "enrolling a host";
        let now = now_micros();
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let token: Option<String> = sqlx::query_scalar(
            "SELECT id FROM host_enrollment_tokens WHERE token_hash = $1 AND use_count < max_uses \
             AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let Some(token_id) = token else {
            return Err(Error::Unauthenticated {
                message:
                    "the enrollment token is unknown, already used or expired; make a new one with \
                          `stratus host enroll-token`"
                        .into(),
            });
        };
        let id = HostId::new();
        sqlx::query(
            "INSERT INTO hosts (id, name, state, zone, cluster, address, cpus, memory_bytes, disk_bytes, \
             qemu_version, accel, driver, credential_hash, generation, desired_revision, created_at, \
             last_heartbeat_at, tags, migration_transport) \
             VALUES ($1, $2, 'up', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, 1, $13, $13, $14, $15)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(zone)
        .bind(cluster)
        .bind(address)
        .bind(i64::from(facts.cpus))
        .bind(i64_of(facts.memory_bytes))
        .bind(i64_of(facts.disk_bytes))
        .bind(facts.qemu_version.clone())
        .bind(facts.accel.clone())
        .bind(facts.driver.clone())
        .bind(credential_hash)
        .bind(now)
        .bind(crate::model::tags_column(tags))
        .bind(crate::model::transport_column(facts.migration_tls))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict("name_in_use", format!("a host named {name:?} is already enrolled"))
            } else {
                db_error(ctx, e)
            }
        })?;
        crate::scheduling::ensure_cluster(&mut tx, cluster, now).await?;
        // Spent under the same condition it was checked with: two hosts
        // racing for a token's last use cannot both enroll.
        let spent = sqlx::query(
            "UPDATE host_enrollment_tokens SET use_count = use_count + 1, used_at = $1, host_id = $2 \
             WHERE id = $3 AND use_count < max_uses",
        )
        .bind(now)
        .bind(id.to_string())
        .bind(token_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if spent.rows_affected() != 1 {
            return Err(Error::Unauthenticated {
                message:
                    "the enrollment token was used up while this host enrolled; make a new one \
                          with `stratus host enroll-token`"
                        .into(),
            });
        }
        let host = fetch_host(&mut tx, id).await?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(host)
    }

    pub async fn host_by_credential(
        &self,
        credential_hash: &str,
    ) -> Result<Option<HostRecord>, Error> {
        let row = sqlx::query(&format!(
            "{} WHERE credential_hash = $1",
            crate::hosts::SELECT
        ))
        .bind(credential_hash)
        .fetch_optional(&self.read)
        .await
        .map_err(|e| db_error("authenticating a host", e))?;
        row.as_ref().map(HostRecord::from_row).transpose()
    }

    /// A heartbeat: facts and liveness. An unreachable host is up again; a
    /// host in maintenance stays there.
    pub async fn host_heartbeat(&self, id: HostId, facts: &HostFacts) -> Result<HostRecord, Error> {
        sqlx::query(
            "UPDATE hosts SET cpus = $1, memory_bytes = $2, disk_bytes = $3, qemu_version = $4, accel = $5, \
             driver = $6, last_heartbeat_at = $7, migration_transport = $9, \
             state = CASE WHEN state = 'unreachable' THEN 'up' ELSE state END WHERE id = $8",
        )
        .bind(i64::from(facts.cpus))
        .bind(i64_of(facts.memory_bytes))
        .bind(i64_of(facts.disk_bytes))
        .bind(facts.qemu_version.clone())
        .bind(facts.accel.clone())
        .bind(facts.driver.clone())
        .bind(now_micros())
        .bind(id.to_string())
        .bind(crate::model::transport_column(facts.migration_tls))
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a heartbeat", e))?;
        self.host_get(id).await
    }

    /// Records that these hosts were heard from at `at` (one statement for
    /// all of them): how a controller writes thousands of heartbeats a
    /// second as a few transactions. An unreachable host is up again; a
    /// host in maintenance stays there.
    pub async fn hosts_heard(&self, hosts: &[HostId], at: i64) -> Result<(), Error> {
        for chunk in hosts.chunks(500) {
            let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "UPDATE hosts SET last_heartbeat_at = $1, \
                 state = CASE WHEN state = 'unreachable' THEN 'up' ELSE state END \
                 WHERE id IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(at);
            for h in chunk {
                q = q.bind(h.to_string());
            }
            q.execute(&self.write)
                .await
                .map_err(|e| db_error("recording heartbeats", e))?;
        }
        Ok(())
    }

    /// The observation generation last applied for each VM on a host: lets
    /// a report skip (without a write) every observation that is not newer.
    pub async fn host_observed_generations(
        &self,
        host: HostId,
    ) -> Result<std::collections::HashMap<VmId, i64>, Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, observed_generation FROM vms WHERE host_id = $1")
                .bind(host.to_string())
                .fetch_all(&self.read)
                .await
                .map_err(|e| db_error("reading a host's observations", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, g)| id.parse().ok().map(|v| (v, g)))
            .collect())
    }

    /// Marks hosts silent since `before` as unreachable. Returns how many.
    pub async fn host_mark_unreachable(&self, before: i64) -> Result<u64, Error> {
        let done = sqlx::query(
            "UPDATE hosts SET state = 'unreachable' WHERE state = 'up' AND last_heartbeat_at < $1",
        )
        .bind(before)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("marking hosts unreachable", e))?;
        Ok(done.rows_affected())
    }

    /// Everything placed on a host, with each VM's image.
    pub async fn host_desired(
        &self,
        id: HostId,
    ) -> Result<(i64, Vec<(VmRecord, ImageRecord)>), Error> {
        let host = self.host_get(id).await?;
        let vms = self
            .vm_list(
                &crate::VmListFilter {
                    host: Some(id),
                    ..Default::default()
                },
                &crate::PageRequest::first(crate::page::MAX_LIMIT),
            )
            .await?;
        // The images of those VMs in one query, not one per VM.
        let rows = sqlx::query(&format!(
            "{} WHERE id IN (SELECT image_id FROM vms WHERE host_id = $1)",
            crate::images::SELECT
        ))
        .bind(id.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading a host's images", e))?;
        let mut images = std::collections::HashMap::new();
        for r in &rows {
            let img = ImageRecord::from_row(r)?;
            images.insert(img.id, img);
        }
        // VMs migrating here: the agent must know them (not as orphans) and
        // leave them to the migration.
        let incoming = sqlx::query(&format!(
            "{} WHERE migration_target = $1",
            crate::vms::SELECT
        ))
        .bind(id.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading a host's incoming VMs", e))?;
        let mut items = vms.items;
        for r in &incoming {
            items.push(VmRecord::from_row(r)?);
        }
        let mut out = Vec::with_capacity(items.len());
        for vm in items {
            // An image deleted meanwhile (it cannot be while in use, but a
            // VM placed between the two reads may name one not yet read).
            let image = match images.get(&vm.image_id) {
                Some(i) => i.clone(),
                None => self.image_get(vm.image_id).await?,
            };
            out.push((vm, image));
        }
        Ok((host.desired_revision, out))
    }

    /// Whether any VM placed on `host` was created from `image`, or a
    /// volume being attached to one of its VMs starts from it (which is what
    /// entitles the host to download it).
    pub async fn host_uses_image(
        &self,
        host: HostId,
        image: stratus_common::ImageId,
    ) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM vms WHERE (host_id = $1 OR migration_target = $1) \
                 AND image_id = $2) + \
                 (SELECT COUNT(*) FROM volumes v JOIN vms m ON m.id = v.vm_id \
                  WHERE m.host_id = $1 AND v.image_id = $2)",
        )
        .bind(host.to_string())
        .bind(image.to_string())
        .fetch_one(&self.read)
        .await
        .map_err(|e| db_error("checking a host's images", e))?;
        Ok(n > 0)
    }

    /// vCPUs, memory and disk of the VMs on a host, summed from the VMs
    /// themselves: what the host's stored allocation must always equal.
    pub async fn host_allocated(&self, id: HostId) -> Result<(u64, u64, u64), Error> {
        // SUM of BIGINT is NUMERIC on PostgreSQL: cast back so both
        // backends answer a 64-bit integer.
        let row: (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), CAST(COALESCE(SUM(memory_bytes), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN pool_id IS NULL THEN disk_bytes ELSE 0 END), 0) AS BIGINT) \
             FROM vms WHERE host_id = $1",
        )
        .bind(id.to_string())
        .fetch_one(&self.read)
        .await
        .map_err(|e| db_error("summing a host's allocation", e))?;
        let u = |v: Option<i64>| v.map(crate::model::u64_of).unwrap_or(0);
        Ok((u(row.0), u(row.1), u(row.2)))
    }

    /// Applies one observation from a host, unless a newer one was already
    /// applied (or the VM is not on that host). When no job holds the VM,
    /// its shown state follows what was observed (a crash, say), and so
    /// does its reason, except that a crashed VM whose automatic restarts
    /// were given up keeps the reason that says so.
    pub async fn vm_apply_observation(
        &self,
        host: HostId,
        obs: &VmObservation,
    ) -> Result<bool, Error> {
        let shown: Option<VmState> = match obs.state {
            ObservedVmState::Running => Some(VmState::Running),
            ObservedVmState::Stopped => Some(VmState::Stopped),
            ObservedVmState::Crashed => Some(VmState::Crashed),
            ObservedVmState::Failed => Some(VmState::Failed),
            ObservedVmState::Absent => None,
        };
        let guest = obs
            .guest
            .as_ref()
            .map(|g| serde_json::to_string(g).unwrap_or_default());
        let generation = i64::try_from(obs.generation).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "UPDATE vms SET observed_state = $1, observed_reason = $2, observed_generation = $3, \
             observed_reboot_generation = $4, observed_at = $5, guest = COALESCE($6, guest), \
             observed_intent_generation = COALESCE($10, observed_intent_generation), \
             state = CASE WHEN active_job_id IS NULL AND $7 <> '' THEN $7 ELSE state END, \
             state_reason = CASE WHEN active_job_id IS NULL AND $7 <> '' \
             AND NOT (auto_restart_given_up_at IS NOT NULL AND $7 = 'crashed') THEN $2 ELSE state_reason END \
             WHERE id = $8 AND host_id = $9 AND observed_generation < $3",
        )
        .bind(enum_str(&obs.state))
        .bind(obs.reason.clone())
        .bind(generation)
        .bind(i64::try_from(obs.reboot_generation).unwrap_or(i64::MAX))
        .bind(now_micros())
        .bind(guest)
        .bind(shown.map(|s| enum_str(&s)).unwrap_or_default())
        .bind(obs.vm_id.to_string())
        .bind(host.to_string())
        .bind(obs.intent_generation.map(|g| i64::try_from(g).unwrap_or(i64::MAX)))
        .execute(&self.write)
        .await
        .map_err(|e| db_error("applying a VM observation", e))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn host_request_create(
        &self,
        host: HostId,
        vm: Option<VmId>,
        kind: &str,
        payload: &serde_json::Value,
        expires_at: i64,
    ) -> Result<uuid::Uuid, Error> {
        let id = uuid::Uuid::now_v7();
        self.host_request_ensure(id, host, vm, kind, payload, expires_at)
            .await?;
        Ok(id)
    }

    /// Queues the request `id` unless it exists already (a saga step that
    /// runs again, on this controller or another, finds its request rather
    /// than sending a second one).
    pub async fn host_request_ensure(
        &self,
        id: uuid::Uuid,
        host: HostId,
        vm: Option<VmId>,
        kind: &str,
        payload: &serde_json::Value,
        expires_at: i64,
    ) -> Result<(), Error> {
        let ctx = "queueing a host request";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let inserted = sqlx::query(
            "INSERT INTO host_requests (id, host_id, vm_id, kind, payload, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(host.to_string())
        .bind(vm.map(|v| v.to_string()))
        .bind(kind)
        .bind(payload.to_string())
        .bind(now_micros())
        .bind(expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if inserted.rows_affected() == 0 {
            return Ok(());
        }
        sqlx::query(
            "UPDATE hosts SET desired_revision = desired_revision + 1, desired_changed_at = $2 WHERE id = $1",
        )
            .bind(host.to_string())
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(())
    }

    /// Records a long request's progress; only its host may, and only while
    /// it is pending.
    pub async fn host_request_progress(
        &self,
        id: uuid::Uuid,
        host: HostId,
        done: u64,
        total: u64,
        message: Option<&str>,
    ) -> Result<(), Error> {
        let r = sqlx::query(
            "UPDATE host_requests SET progress_done = $1, progress_total = $2, progress_message = $5 \
             WHERE id = $3 AND host_id = $4 AND answered_at IS NULL",
        )
        .bind(i64::try_from(done).unwrap_or(i64::MAX))
        .bind(i64::try_from(total).unwrap_or(i64::MAX))
        .bind(id.to_string())
        .bind(host.to_string())
        .bind(message.map(str::to_string))
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording a request's progress", e))?;
        if r.rows_affected() == 0 {
            return Err(Error::conflict(
                "request_not_pending",
                "no pending request with that id for this host",
            ));
        }
        Ok(())
    }

    /// Forgets requests answered before `answered_before` and unanswered
    /// ones that expired before `expired_before`; how many. Each exec,
    /// backup, verify or delete leaves one row: without this the table only
    /// grows.
    pub async fn host_requests_prune(
        &self,
        answered_before: i64,
        expired_before: i64,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM host_requests WHERE (answered_at IS NOT NULL AND answered_at < $1) \
             OR (answered_at IS NULL AND expires_at < $2)",
        )
        .bind(answered_before)
        .bind(expired_before)
        .execute(&self.write)
        .await
        .map_err(|e| db_error("pruning host requests", e))?;
        Ok(done.rows_affected())
    }

    /// Withdraws a pending request (nobody waits for it any more): the host
    /// stops receiving it and its late answer is refused.
    pub async fn host_request_withdraw(&self, id: uuid::Uuid) -> Result<(), Error> {
        sqlx::query(
            "UPDATE host_requests SET expires_at = $1 WHERE id = $2 AND answered_at IS NULL",
        )
        .bind(now_micros())
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("withdrawing a host request", e))?;
        Ok(())
    }

    /// Unanswered, unexpired requests for a host.
    pub async fn host_requests_pending(
        &self,
        host: HostId,
    ) -> Result<Vec<HostRequestRecord>, Error> {
        let rows = sqlx::query(
            "SELECT id, host_id, kind, payload, answered_at, result, error, progress_done, progress_total, progress_message FROM host_requests \
             WHERE host_id = $1 AND answered_at IS NULL AND expires_at > $2 ORDER BY id",
        )
        .bind(host.to_string())
        .bind(now_micros())
        .fetch_all(&self.read)
        .await
        .map_err(|e| db_error("reading host requests", e))?;
        rows.iter().map(request_from_row).collect()
    }

    pub async fn host_request_get(&self, id: uuid::Uuid) -> Result<HostRequestRecord, Error> {
        let row = sqlx::query("SELECT id, host_id, kind, payload, answered_at, result, error, progress_done, progress_total, progress_message FROM host_requests WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a host request", e))?;
        match row {
            Some(r) => request_from_row(&r),
            None => Err(Error::internal(format!("host request {id} vanished"))),
        }
    }

    /// Records a host's answer; only the host the request was for may answer,
    /// and only once.
    pub async fn host_request_answer(
        &self,
        id: uuid::Uuid,
        host: HostId,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let done = sqlx::query(
            "UPDATE host_requests SET answered_at = $1, result = $2, error = $3 \
             WHERE id = $4 AND host_id = $5 AND answered_at IS NULL",
        )
        .bind(now_micros())
        .bind(result.map(|r| r.to_string()))
        .bind(error.map(str::to_string))
        .bind(id.to_string())
        .bind(host.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("answering a host request", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "request_not_pending",
                "no pending request with that id for this host",
            ));
        }
        Ok(())
    }

    /// Appends console output (bytes from `offset` on), keeping the newest
    /// [`CONSOLE_KEEP`] bytes. Bytes already held are skipped, so agents may
    /// resend after a restart.
    pub async fn vm_console_append(&self, vm: VmId, offset: u64, data: &[u8]) -> Result<(), Error> {
        let ctx = "storing console output";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let row: Option<(i64, i64, String, i64, i64)> = sqlx::query_as(
            "SELECT start_offset, end_offset, data, shift, rebase FROM vm_consoles WHERE vm_id = $1",
        )
        .bind(vm.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        // A VM that moved hosts: the new host counts from its own start.
        let shift = match &row {
            Some((_, e, _, _, rebase)) if *rebase != 0 => *e - i64_of(offset),
            Some((_, _, _, shift, _)) => *shift,
            None => 0,
        };
        let offset = u64::try_from(i64_of(offset) + shift).unwrap_or(0);
        let (mut start, mut buf) = match &row {
            None => (offset, data.to_vec()),
            Some((s, e, d, _, _)) => {
                let (start, end) = (crate::model::u64_of(*s), crate::model::u64_of(*e));
                if offset > end {
                    // A gap (the agent's own bounded log dropped bytes):
                    // what is kept must stay contiguous, so start afresh.
                    (offset, data.to_vec())
                } else {
                    let mut b = STANDARD.decode(d).unwrap_or_default();
                    let skip = usize::try_from(end - offset).unwrap_or(usize::MAX);
                    if skip < data.len() {
                        b.extend_from_slice(&data[skip..]);
                    }
                    (start, b)
                }
            }
        };
        if buf.len() > CONSOLE_KEEP {
            let cut = buf.len() - CONSOLE_KEEP;
            buf.drain(..cut);
            start += cut as u64;
        }
        let end = start + buf.len() as u64;
        let encoded = STANDARD.encode(&buf);
        let q = if row.is_some() {
            "UPDATE vm_consoles SET start_offset = $1, end_offset = $2, data = $3, shift = $5, \
             rebase = 0 WHERE vm_id = $4"
        } else {
            "INSERT INTO vm_consoles (start_offset, end_offset, data, vm_id, shift) \
             VALUES ($1, $2, $3, $4, $5)"
        };
        sqlx::query(q)
            .bind(i64_of(start))
            .bind(i64_of(end))
            .bind(encoded)
            .bind(vm.to_string())
            .bind(shift)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }

    /// Console bytes from `offset` (clamped to what is kept): (data, offset
    /// of data, end offset, whether bytes before were dropped).
    pub async fn vm_console_read(
        &self,
        vm: VmId,
        offset: Option<u64>,
        max: usize,
    ) -> Result<(Vec<u8>, u64, u64, bool), Error> {
        let row: Option<(i64, i64, String)> = sqlx::query_as(
            "SELECT start_offset, end_offset, data FROM vm_consoles WHERE vm_id = $1",
        )
        .bind(vm.to_string())
        .fetch_optional(&self.read)
        .await
        .map_err(|e| db_error("reading console output", e))?;
        let Some((s, e, d)) = row else {
            return Ok((Vec::new(), offset.unwrap_or(0), offset.unwrap_or(0), false));
        };
        let (start, end) = (crate::model::u64_of(s), crate::model::u64_of(e));
        let bytes = STANDARD.decode(d).unwrap_or_default();
        let from = match offset {
            Some(o) => o.clamp(start, end),
            None => end.saturating_sub(max as u64).max(start),
        };
        let lo = usize::try_from(from - start).unwrap_or(0).min(bytes.len());
        let hi = lo.saturating_add(max).min(bytes.len());
        let truncated = offset.is_some_and(|o| o < start);
        Ok((
            bytes[lo..hi].to_vec(),
            from,
            from + (hi - lo) as u64,
            truncated,
        ))
    }

    /// Records an image's kernel-boot parts.
    pub async fn image_set_boot(
        &self,
        id: stratus_common::ImageId,
        kernel_sha256: Option<&str>,
        initrd_sha256: Option<&str>,
        cmdline: Option<&str>,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE images SET kernel_sha256 = $1, initrd_sha256 = $2, cmdline = $3 WHERE id = $4",
        )
        .bind(kernel_sha256.map(str::to_string))
        .bind(initrd_sha256.map(str::to_string))
        .bind(cmdline.map(str::to_string))
        .bind(id.to_string())
        .execute(&self.write)
        .await
        .map_err(|e| db_error("recording kernel boot", e))?;
        Ok(())
    }
}

async fn fetch_host(conn: &mut sqlx::AnyConnection, id: HostId) -> Result<HostRecord, Error> {
    let row = sqlx::query(&format!("{} WHERE id = $1", crate::hosts::SELECT))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("reading a host", e))?;
    match row {
        Some(r) => HostRecord::from_row(&r),
        None => Err(Error::not_found(ResourceKind::Host, id)),
    }
}

fn request_from_row(r: &sqlx::any::AnyRow) -> Result<HostRequestRecord, Error> {
    let parse_json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(HostRequestRecord {
        id: r.parse("id")?,
        host_id: r.parse("host_id")?,
        kind: r.text("kind")?,
        payload: serde_json::from_str(&r.text("payload")?).unwrap_or_default(),
        answered_at: r.opt_int("answered_at")?,
        result: parse_json(r.opt_text("result")?),
        error: r.opt_text("error")?,
        progress: match (r.opt_int("progress_done")?, r.opt_int("progress_total")?) {
            (Some(d), Some(t)) => {
                Some((u64::try_from(d).unwrap_or(0), u64::try_from(t).unwrap_or(0)))
            }
            _ => None,
        },
        progress_message: r.opt_text("progress_message")?,
    })
}

impl Datastore {
    /// Changes what a VM's host should make of it, and tells the host (its
    /// desired revision is bumped in the same transaction).
    pub async fn vm_set_desired(
        &self,
        vm: VmId,
        desired: stratus_api_types::views::VmDesiredState,
    ) -> Result<Option<HostId>, Error> {
        let ctx = "setting a VM's desired state";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        // Unchanged intent is no new intent: no generation bump, so a VM
        // its host holds down after a crash is not released by it.
        let changed = sqlx::query(
            "UPDATE vms SET desired_state = $1, generation = generation + 1, updated_at = $2 \
             WHERE id = $3 AND desired_state <> $1",
        )
        .bind(enum_str(&desired))
        .bind(now_micros())
        .bind(vm.to_string())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        if changed.rows_affected() == 0 {
            tx.commit().await.map_err(|e| db_error(ctx, e))?;
            return Ok(None);
        }
        sqlx::query(
            "UPDATE hosts SET desired_revision = desired_revision + 1, desired_changed_at = $2 \
             WHERE id = (SELECT host_id FROM vms WHERE id = $1)",
        )
        .bind(vm.to_string())
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(ctx, e))?;
        let host: Option<Option<String>> =
            sqlx::query_scalar("SELECT host_id FROM vms WHERE id = $1")
                .bind(vm.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_error(ctx, e))?;
        tx.commit().await.map_err(|e| db_error(ctx, e))?;
        Ok(host.flatten().and_then(|h| h.parse().ok()))
    }
}
