//! Group flush of SQLite's write-ahead log (see [`crate::Datastore::durable`]).
//!
//! Callers take a ticket after their commit returned; a background task
//! reads the newest ticket, *then* flushes the log file, then publishes
//! that ticket as synced. Every commit that finished before a ticket was
//! taken is therefore in a flush that started after it. Committed frames
//! are either still in the log (flushed here) or already checkpointed into
//! the database file (which SQLite's checkpoint flushes itself).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use stratus_common::Error;
use tokio::sync::{watch, Notify};

#[derive(Debug)]
pub(crate) struct WalSyncer {
    requested: Arc<AtomicU64>,
    wake: Arc<Notify>,
    /// (highest ticket synced, the last flush's error if it failed)
    synced: watch::Receiver<(u64, Option<String>)>,
}

impl WalSyncer {
    pub(crate) fn start(wal: PathBuf) -> Self {
        let requested = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let (tx, rx) = watch::channel((0u64, None));
        let (req, w) = (requested.clone(), wake.clone());
        tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                let target = req.load(Ordering::SeqCst);
                if target == done {
                    w.notified().await;
                    continue;
                }
                let path = wal.clone();
                let flushed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    match std::fs::File::open(&path) {
                        Ok(f) => f.sync_data(),
                        // No log yet: nothing was written through it.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(e),
                    }
                })
                .await;
                let err = match flushed {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("flushing {}: {e}", wal.display())),
                    Err(e) => Some(format!("the flush task failed: {e}")),
                };
                if let Some(e) = &err {
                    tracing::error!(error = %e, "the database log could not be flushed");
                }
                done = target;
                if tx.send((target, err)).is_err() {
                    return; // Every store handle is gone.
                }
            }
        });
        WalSyncer {
            requested,
            wake,
            synced: rx,
        }
    }

    pub(crate) async fn sync(&self) -> Result<(), Error> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        let mut rx = self.synced.clone();
        let seen = rx
            .wait_for(|(synced, _)| *synced >= ticket)
            .await
            .map_err(|_| Error::internal("the database log flusher stopped"))?;
        match &seen.1 {
            Some(e) => Err(Error::internal(e.clone())),
            None => Ok(()),
        }
    }
}
