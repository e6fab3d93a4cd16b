//! Facts about the host the QEMU driver runs on: CPUs, memory, and the file
//! system of the data directory.

use std::path::Path;

use crate::DriverError;

/// Online CPUs the driver may use.
pub(crate) fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Total memory (`MemTotal` of `/proc/meminfo`), in bytes.
pub(crate) fn memory_bytes() -> Result<u64, DriverError> {
    let path = Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path)
        .map_err(|e| DriverError::io("cannot read the host's memory size", path, e))?;
    parse_mem_total(&text).ok_or_else(|| {
        DriverError::io(
            "no MemTotal line",
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unexpected /proc/meminfo format",
            ),
        )
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Size and free space (for unprivileged users) of the file system holding `dir`.
pub(crate) fn disk_bytes(dir: &Path) -> Result<(u64, u64), DriverError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| {
        DriverError::io(
            "cannot read the size of the data directory's file system",
            dir,
            e.into(),
        )
    })?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    Ok((total, free))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts_are_plausible() {
        assert_eq!(
            parse_mem_total("MemTotal:       24683880 kB\nMemFree: 1 kB\n"),
            Some(24683880 * 1024)
        );
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(cpus() >= 1);
        assert!(memory_bytes().expect("meminfo") > 0);
        let (total, free) = disk_bytes(Path::new("/")).expect("statvfs");
        assert!(total > 0 && free <= total);
    }
}
