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
    /// A command timed out or the channel failed under it. The `qapi` crate tracks guest
    /// agent commands under one id (the channel has none), so a command
    /// still pending makes the next one panic ("duplicate command id"), and
    /// a late reply would answer the wrong command: such a connection is
    /// never used again; callers reconnect.
    broken: std::sync::atomic::AtomicBool,
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
            let conn = QgaConn {
                service,
                reader,
                broken: std::sync::atomic::AtomicBool::new(false),
            };
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

    /// Runs one guest agent command with a time bound. After a timeout or
    /// an I/O error the connection refuses every later command (see
    /// [`QgaConn::broken`]): open a new one.
    pub async fn run<C>(&self, command: C, timeout: Duration) -> Result<C::Ok, BoxError>
    where
        C: Command + QgaCommand,
    {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Acquire) {
            return Err(
                "an earlier command on this guest agent connection failed or timed out; \
                        reconnect"
                    .into(),
            );
        }
        match tokio::time::timeout(timeout, self.service.execute(command)).await {
            Ok(Ok(v)) => Ok(v),
            // The agent's error reply (an unknown command, say) is a whole
            // answer: the connection stays in step.
            Ok(Err(qapi::ExecuteError::Qapi(e))) => Err(e.into()),
            Ok(Err(e)) => {
                self.broken.store(true, Ordering::Release);
                Err(e.into())
            }
            Err(_) => {
                self.broken.store(true, Ordering::Release);
                Err(format!("no answer within {}s", timeout.as_secs()).into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A guest agent that answers `guest-sync` and then reads every later
    /// command without answering, as a guest too busy to reply does.
    async fn silent_agent(path: &Path) {
        let listener = tokio::net::UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (r, mut w) = tokio::io::split(socket);
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["execute"] == "guest-sync" {
                    let reply = format!("{{\"return\": {}}}\n", v["arguments"]["id"]);
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }

    /// A command that timed out leaves the connection unusable, and the next
    /// command on it is an error (not the `qapi` crate's panic over a
    /// second command under the pending one's id, which aborted a backup's
    /// thaw after its freeze timed out).
    #[tokio::test]
    async fn a_timed_out_command_breaks_the_connection_instead_of_panicking() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("qga.sock");
        silent_agent(&path).await;
        let conn = QgaConn::connect(&path, Duration::from_secs(5))
            .await
            .expect("synced");
        let e = conn
            .run(qapi::qga::guest_ping {}, Duration::from_millis(100))
            .await
            .expect_err("no answer");
        assert!(e.to_string().contains("no answer"), "{e}");
        let e = conn
            .run(
                qapi::qga::guest_fsfreeze_thaw {},
                Duration::from_millis(100),
            )
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("reconnect"), "{e}");
    }
}
