//! Shared storage pools as this host sees them.
//!
//! The controller names every pool in its answer to each report; the agent
//! checks each directory (it exists, it is this pool's and no other's, it
//! is writable) and reports what it found, with the file system's size and
//! free space. A report carries the pools only when what it found changed,
//! or every [`REFRESH`] for the free space, so 10,000 hosts do not rewrite
//! the same rows every few seconds.
//!
//! **Why a marker file.** Two hosts see "the same pool" only if they see the
//! same directory, not merely the same path: a host that forgot to mount
//! the share sees an empty local directory there. The first host to check
//! a pool writes `.stratus-pool` (the pool's id) into it; every other host
//! must find that file, so a host looking at the wrong directory reports an
//! error instead of writing disks nobody else can read. (The first host to
//! check must be one that mounts the real share: an operator creating a
//! pool checks it from the hosts they meant.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stratus_client::types::{PoolAssignment, PoolReport, StoragePoolId};

/// How often the pools are reported even when nothing changed (their free
/// space moves).
pub(crate) const REFRESH: Duration = Duration::from_secs(60);
/// How long one pool's check may take: a hung network mount must not hold
/// up the report.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The marker file in a pool's directory.
pub(crate) const MARKER: &str = ".stratus-pool";

/// What the reporter remembers about pools.
#[derive(Default)]
pub(crate) struct PoolBook {
    /// The pools the controller named last.
    pub assigned: Vec<PoolAssignment>,
    /// What the last acknowledged report said, and when it was sent.
    pub sent: Option<(Vec<PoolReport>, Instant)>,
}

impl PoolBook {
    /// Whether `reports` should go in the next report: they differ from the
    /// last ones sent in anything but free space, or it is time to refresh.
    pub fn worth_sending(&self, reports: &[PoolReport]) -> bool {
        match &self.sent {
            None => true,
            Some((last, at)) => {
                at.elapsed() >= REFRESH
                    || last.len() != reports.len()
                    || last.iter().zip(reports).any(|(a, b)| {
                        a.pool_id.0 != b.pool_id.0
                            || a.error != b.error
                            || a.total_bytes != b.total_bytes
                    })
            }
        }
    }
}

/// Whether two lists name the same pools at the same paths.
pub(crate) fn same_pools(a: &[PoolAssignment], b: &[PoolAssignment]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.id.0 == y.id.0 && x.name == y.name && x.path == y.path)
}

/// Checks every pool, each within [`CHECK_TIMEOUT`].
pub(crate) async fn check_all(pools: &[PoolAssignment]) -> Vec<PoolReport> {
    let mut out = Vec::with_capacity(pools.len());
    for p in pools {
        let id = p.id.clone();
        let path = PathBuf::from(&p.path);
        let uuid = p.id.0;
        let checked = tokio::time::timeout(
            CHECK_TIMEOUT,
            tokio::task::spawn_blocking(move || check(&path, &uuid.to_string())),
        )
        .await;
        let report = match checked {
            Ok(Ok(Ok((total, available)))) => PoolReport {
                pool_id: id,
                error: None,
                total_bytes: total,
                available_bytes: available,
            },
            Ok(Ok(Err(why))) => failed(id, why),
            Ok(Err(join)) => failed(id, format!("the check failed: {join}")),
            Err(_) => failed(
                id,
                format!(
                    "the directory did not answer within {} s (a hung mount?)",
                    CHECK_TIMEOUT.as_secs()
                ),
            ),
        };
        out.push(report);
    }
    out
}

/// Prepares this host to handle a volume in a shared pool: checks the pool
/// as a report would (so a host that lost its mount since its last report
/// refuses rather than make a file nobody else sees), then tells the driver
/// the volume's files are in it. Called before every request on a pool
/// volume (attach, resize, delete), whichever host it goes to.
pub(crate) async fn use_volume_pool(
    shared: &std::sync::Arc<crate::agent::Shared>,
    volume_id: uuid::Uuid,
    pool: &PoolAssignment,
) -> Result<(), String> {
    let path = PathBuf::from(&pool.path);
    let uuid = pool.id.0.to_string();
    let dir = path.clone();
    let checked = tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::task::spawn_blocking(move || check(&dir, &uuid)),
    )
    .await;
    let why = match checked {
        Ok(Ok(Ok(_))) => None,
        Ok(Ok(Err(why))) => Some(why),
        Ok(Err(join)) => Some(format!("the check failed: {join}")),
        Err(_) => Some(format!(
            "the directory did not answer within {} s (a hung mount?)",
            CHECK_TIMEOUT.as_secs()
        )),
    };
    if let Some(why) = why {
        return Err(format!(
            "this host cannot use storage pool {:?}, which holds volume {volume_id}: {why}",
            pool.name
        ));
    }
    shared
        .driver
        .volume_use_pool(volume_id, &path)
        .await
        .map_err(|e| crate::error::chain(&e))
}

fn failed(pool_id: StoragePoolId, error: String) -> PoolReport {
    PoolReport {
        pool_id,
        error: Some(error),
        total_bytes: 0,
        available_bytes: 0,
    }
}

/// Checks one pool directory: returns its file system's size and free
/// space, or why this host cannot use it.
pub(crate) fn check(dir: &Path, pool_id: &str) -> Result<(u64, u64), String> {
    let meta =
        std::fs::metadata(dir).map_err(|e| format!("{} is not reachable: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let marker = dir.join(MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(found) => {
            let found = found.trim();
            if found != pool_id {
                return Err(format!(
                    "{} belongs to another storage pool ({found}); is the right share mounted?",
                    dir.display()
                ));
            }
            // Writable? Disks are written here.
            let probe = dir.join(format!(".stratus-probe-{}", std::process::id()));
            std::fs::write(&probe, b"probe")
                .map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => claim(&marker, pool_id)?,
        Err(e) => return Err(format!("cannot read {}: {e}", marker.display())),
    }
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| format!("cannot read the size of {}: {e}", dir.display()))?;
    Ok((
        st.f_blocks.saturating_mul(st.f_frsize),
        st.f_bavail.saturating_mul(st.f_frsize),
    ))
}

/// Writes the marker of a pool no host has checked yet: complete under a
/// temporary name, then linked into place, which fails if another host got
/// there first (then its marker is read again next time).
fn claim(marker: &Path, pool_id: &str) -> Result<(), String> {
    let dir = marker.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(".stratus-pool.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{pool_id}\n"))
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    let linked = std::fs::hard_link(&tmp, marker);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let found = std::fs::read_to_string(marker).unwrap_or_default();
            if found.trim() == pool_id {
                Ok(())
            } else {
                Err(format!(
                    "{} belongs to another storage pool ({}); is the right share mounted?",
                    dir.display(),
                    found.trim()
                ))
            }
        }
        Err(e) => Err(format!("cannot mark {} as the pool's: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_check_marks_the_pool_and_others_must_find_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (total, free) = check(dir.path(), "pool-a").expect("first check");
        assert!(total > 0 && free <= total);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(MARKER)).expect("marker"),
            "pool-a\n"
        );
        // Checked again (the same host, or another seeing the same share).
        check(dir.path(), "pool-a").expect("second check");
        // A host that sees this directory for another pool is told so.
        let err = check(dir.path(), "pool-b").expect_err("another pool");
        assert!(
            err.contains("belongs to another storage pool (pool-a)"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_directory_or_a_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check(&dir.path().join("absent"), "p").expect_err("absent");
        assert!(err.contains("is not reachable"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = check(&file, "p").expect_err("file");
        assert!(err.contains("is not a directory"), "{err}");
    }

    #[test]
    fn reports_are_resent_only_when_they_change_or_grow_old() {
        let id = StoragePoolId(uuid::Uuid::now_v7());
        let ok = PoolReport {
            pool_id: id.clone(),
            error: None,
            total_bytes: 100,
            available_bytes: 50,
        };
        let mut book = PoolBook::default();
        assert!(book.worth_sending(std::slice::from_ref(&ok)));
        book.sent = Some((vec![ok.clone()], Instant::now()));
        let mut freer = ok.clone();
        freer.available_bytes = 40;
        assert!(!book.worth_sending(&[freer]));
        assert!(book.worth_sending(&[failed(id.clone(), "gone".into())]));
        assert!(book.worth_sending(&[]));
        book.sent = Some((vec![ok.clone()], Instant::now() - REFRESH));
        assert!(book.worth_sending(&[ok]));
    }
}
