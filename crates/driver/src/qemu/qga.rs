//! The QEMU guest agent (qemu-ga in the guest, reached through the VM's
//! `run/qga.sock` virtio-serial chardev), through the `qapi` crate.
//!
//! The channel is a byte stream without request ids, and a reply the previous
//! client never read may still be in flight. So every connection starts with
//! `guest-sync` and a random id, and is thrown away (and reopened) when the
//! agent answers anything else. One connection per driver call: the chardev
//! serves a single client, and callers hold the VM's guest agent lock.

use std::path::Path;
use std::time::{Duration, Instant};

use qapi::futures::{QapiService, QgaStreamTokio};
use qapi::qga::QgaCommand;
use qapi::Command;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::error::BoxError;

type QgaService = QapiService<QgaStreamTokio<WriteHalf<UnixStream>>>;

/// A synced guest agent connection. Dropping it closes the socket.
pub(crate) struct QgaConn {
    service: QgaService,
    reader: JoinHandle<()>,
}

impl Drop for QgaConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QgaConn {
    /// Opens the socket and syncs with the agent, retrying on a stale reply,
    /// for at most `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QgaConn, BoxError> {
        let deadline = Instant::now() + timeout;
        loop {
            let socket = UnixStream::connect(path).await?;
            let (r, w) = tokio::io::split(socket);
            let (service, reader) = QgaStreamTokio::open_split(r, w).spawn_tokio();
            let conn = QgaConn { service, reader };
            let left = deadline.saturating_duration_since(Instant::now());
            let sync_id =
                i32::from_ne_bytes(uuid::Uuid::new_v4().as_bytes()[..4].try_into()?) & 0x3fff_ffff;
            match tokio::time::timeout(left, conn.service.guest_sync(sync_id)).await {
                Ok(Ok(())) => return Ok(conn),
                Err(_) => return Err("the guest agent did not answer guest-sync".into()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "guest agent sync failed; reconnecting");
                    drop(conn);
                    if Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Runs one guest agent command with a time bound.
    pub async fn run<C>(&self, command: C, timeout: Duration) -> Result<C::Ok, BoxError>
    where
        C: Command + QgaCommand,
    {
        match tokio::time::timeout(timeout, self.service.execute(command)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(format!("no answer within {}s", timeout.as_secs()).into()),
        }
    }
}
