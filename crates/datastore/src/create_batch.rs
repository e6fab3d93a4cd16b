//! Group commit for VM creates.
//!
//! **Why.** A create is a transaction of its own (VM rows, jobs, their first
//! events and the hosts' claims) and every commit costs a durable flush of
//! the log. One flush per create caps a store at a few thousand creates a
//! second; sharing the flush across every create waiting at that moment
//! lifts the cap without weakening durability (each caller is answered only
//! after the commit that holds its rows).
//!
//! **How.** Callers queue their create; a few writer tasks each take what is
//! queued (up to [`MAX_VMS`]) and write it as *one* transaction with
//! multi-row statements: one `INSERT` for the VMs, one for the jobs, one for
//! their events, and one guarded `UPDATE` that claims every host at once.
//! If anything in that transaction fails — a duplicate name, a host whose
//! guard refuses, a server group to check — it is rolled back and each
//! create is written on its own, so every caller gets exactly its own
//! outcome. Nothing is ever half-written.

use std::sync::Arc;

use sqlx::AnyPool;
use stratus_api_types::views::GroupPolicy;
use stratus_common::time::now_micros;
use stratus_common::ServerGroupId;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::db_error;
use crate::model::{JobRecord, VmRecord};
use crate::vms::{create_one, CreateError, VmToCreate};

/// Most VMs one combined transaction writes (it bounds the statements'
/// parameter count: 17 per VM stays far below SQLite's limit of 32766).
const MAX_VMS: usize = 512;

type Outcome = Result<Vec<(VmRecord, JobRecord)>, CreateError>;

struct Submission {
    items: Vec<VmToCreate>,
    group: Option<(ServerGroupId, GroupPolicy)>,
    reply: oneshot::Sender<Outcome>,
}

/// The queue in front of the writer tasks.
#[derive(Debug)]
pub(crate) struct Combiner {
    tx: mpsc::UnboundedSender<Submission>,
}

impl Combiner {
    /// Starts `writers` writer tasks on `pool` (one on SQLite, whose single
    /// writer connection would serialise more anyway).
    pub(crate) fn start(pool: AnyPool, writers: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Submission>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            let (pool, rx) = (pool.clone(), rx.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        let mut n = first.items.len();
                        let mut batch = vec![first];
                        while n < MAX_VMS {
                            match rx.try_recv() {
                                Ok(s) => {
                                    n += s.items.len();
                                    batch.push(s);
                                }
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    write_batch(&pool, batch).await;
                }
            });
        }
        Combiner { tx }
    }

    pub(crate) async fn submit(
        &self,
        items: Vec<VmToCreate>,
        group: Option<(ServerGroupId, GroupPolicy)>,
    ) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let s = Submission {
            items,
            group,
            reply,
        };
        if self.tx.send(s).is_err() {
            return Err(CreateError::Other(stratus_common::Error::Unavailable {
                message: "the store is shutting down".into(),
            }));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CreateError::Other(stratus_common::Error::Unavailable {
                message: "the store's writer stopped".into(),
            }))
        })
    }
}

async fn write_batch(pool: &AnyPool, batch: Vec<Submission>) {
    let combinable = batch.len() > 1 && batch.iter().all(|s| s.group.is_none());
    if combinable {
        let items: Vec<&VmToCreate> = batch.iter().flat_map(|s| s.items.iter()).collect();
        match write_combined(pool, &items).await {
            Ok(mut records) => {
                // Hand each caller its own records, in order.
                let mut rest = records.drain(..);
                for s in batch {
                    let mine: Vec<_> = rest.by_ref().take(s.items.len()).collect();
                    let _ = s.reply.send(Ok(mine));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = ?e, creates = batch.len(), "combined create fell back to one by one");
            }
        }
    }
    for s in batch {
        let out = create_one(pool, &s.items, s.group).await;
        let _ = s.reply.send(out);
    }
}

/// Writes every VM in one transaction, or nothing.
async fn write_combined(
    pool: &AnyPool,
    items: &[&VmToCreate],
) -> Result<Vec<(VmRecord, JobRecord)>, CreateError> {
    let ctx = "recording new VMs";
    let now = now_micros();
    let mut tx = pool.begin().await.map_err(|e| db_error(ctx, e))?;

    // Claims: one guarded UPDATE for every host at once. If any host's guard
    // refuses, the whole batch is rolled back (then retried one create at a
    // time, so each caller gets its own outcome).
    let per_host = crate::vms::claims_of(items.iter().copied());
    if !crate::vms::claim_hosts(&mut tx, &per_host, now).await? {
        return Err(CreateError::HostsChanged(vec![]));
    }

    // The VMs, their jobs and the jobs' first events: one statement each.
    let mut records = Vec::with_capacity(items.len());
    let mut vm_sql = String::from(
        "INSERT INTO vms (id, project_id, name, flavor_id, image_id, vcpus, memory_bytes, disk_bytes, \
         desired_state, state, active_job_id, generation, created_at, updated_at, host_id, \
         server_group_id, placement, restart_policy) VALUES ",
    );
    let mut job_sql = String::from(
        "INSERT INTO jobs (id, project_id, kind, target_kind, target_id, state, progress, params, \
         idempotency_key, created_at, updated_at) VALUES ",
    );
    let mut event_sql =
        String::from("INSERT INTO job_events (job_id, seq, at, step, message) VALUES ");
    for n in 0..items.len() {
        let sep = if n > 0 { ", " } else { "" };
        let v = n * crate::vms::VM_INSERT_VALUES;
        let p = |k: usize| format!("${}", v + k);
        vm_sql.push_str(&format!(
            "{sep}({}, {}, {}, {}, {}, {}, {}, {}, {}, 'creating', {}, 1, {}, {}, {}, {}, {}, {})",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11),
            p(11),
            p(12),
            p(13),
            p(14),
            p(15)
        ));
        let j = n * 8;
        job_sql.push_str(&format!(
            "{sep}(${}, ${}, ${}, ${}, ${}, 'queued', 0, ${}, ${}, ${}, ${})",
            j + 1,
            j + 2,
            j + 3,
            j + 4,
            j + 5,
            j + 6,
            j + 7,
            j + 8,
            j + 8
        ));
        let e = n * 2;
        event_sql.push_str(&format!(
            "{sep}(${}, 1, ${}, 'queued', 'job accepted')",
            e + 1,
            e + 2
        ));
    }
    let mut vq = sqlx::query(&vm_sql);
    let mut jq = sqlx::query(&job_sql);
    let mut eq = sqlx::query(&event_sql);
    for i in items {
        let vm = &i.vm;
        vq = crate::vms::bind_vm(vq, i, now)?;
        jq = jq
            .bind(i.job.id.to_string())
            .bind(i.job.project_id.map(|p| p.to_string()))
            .bind(i.job.kind.clone())
            .bind(i.job.target_kind)
            .bind(i.job.target_id.to_string())
            .bind(i.job.params.to_string())
            .bind(i.job.idempotency_key.clone())
            .bind(now);
        eq = eq.bind(i.job.id.to_string()).bind(now);
        records.push((
            VmRecord::created(vm, i.host, i.job.id, now),
            JobRecord::queued(&i.job, now),
        ));
    }
    vq.execute(&mut *tx).await.map_err(|e| db_error(ctx, e))?;
    jq.execute(&mut *tx).await.map_err(|e| db_error(ctx, e))?;
    eq.execute(&mut *tx).await.map_err(|e| db_error(ctx, e))?;
    tx.commit().await.map_err(|e| db_error(ctx, e))?;
    Ok(records)
}
