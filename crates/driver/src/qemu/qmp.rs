//! QMP over the VM's unix socket, through the `qapi` crate: connect and
//! negotiate, and run one typed command with a time bound.
//!
//! A QMP connection answers commands only while its event stream is polled;
//! the VM's monitor task polls it (see `monitor` in the parent module) and
//! publishes the command half for everyone else.

use std::io;
use std::path::Path;
use std::time::Duration;

use qapi::futures::{QapiEvents, QapiService, QmpStreamTokio};
use qapi::qmp::QmpCommand;
use qapi::Command;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::DriverError;

/// The command half of a QMP connection.
pub(crate) type QmpService = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;
/// The event half; polling it also delivers command responses.
pub(crate) type QmpEvents = QapiEvents<QmpStreamTokio<ReadHalf<UnixStream>>>;

/// Connects to QEMU's QMP socket and leaves capability negotiation done.
pub(crate) async fn connect(path: &Path, timeout: Duration) -> io::Result<(QmpService, QmpEvents)> {
    let negotiate = async {
        let negotiation = QmpStreamTokio::open_uds(path).await?;
        let stream = negotiation.negotiate().await?;
        Ok::<_, io::Error>(stream.into_parts())
    };
    tokio::time::timeout(timeout, negotiate)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no QMP greeting"))?
}

/// Runs `command`, failing with [`DriverError::Qemu`] (QEMU said no) or
/// [`DriverError::Timeout`].
pub(crate) async fn execute<C>(
    qmp: &QmpService,
    command: C,
    timeout: Duration,
    what: &str,
) -> Result<C::Ok, DriverError>
where
    C: Command + QmpCommand,
{
    match tokio::time::timeout(timeout, qmp.execute(command)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DriverError::qemu(
            format!("QMP {} failed ({what})", C::NAME),
            e,
        )),
        Err(_) => Err(DriverError::timeout(format!(
            "waiting {}s for QMP {} ({what})",
            timeout.as_secs(),
            C::NAME
        ))),
    }
}
