//! The placement benchmark behind `stratus bench placement`: a seeded fleet
//! and workload, every placement timed, then an independent check of the
//! result (capacity recomputed from the placements, anti-affinity, every
//! request's constraints) and a sample of choices compared with the full
//! scan's.
//!
//! The fleet: hosts of four sizes (32–128 vCPUs, 128–512 GiB, 2–8 TiB) in
//! three zones and four clusters (two spread, two pack, with different
//! overcommit ratios), tagged `ssd`, `sriov`, `gpu` the way hardware classes
//! are, a few percent not up, each already 0–25% allocated. The workload:
//! four flavors (1/2/20, 2/4/40, 4/8/80, 8/16/160 vCPU/GiB/GiB), consecutive
//! VMs grouped `group_size` at a time into hard anti-affinity groups, each
//! group with one set of constraints (most none; some a zone, a cluster, a
//! required or forbidden tag).

use std::collections::HashSet;
use std::fmt;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratus_common::bytes::GIB;
use stratus_common::{HostId, ServerGroupId};
use uuid::Uuid;

use crate::{
    ClusterPolicy, Engine, GroupPolicy, HostCondition, HostSnapshot, Ratios, Request, Resources,
    Weigher,
};

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    pub hosts: usize,
    pub vms: usize,
    /// VMs per hard anti-affinity group (0: no groups).
    pub group_size: usize,
    pub seed: u64,
    /// Compare every n-th choice with the full scan's (0: never). The scans
    /// are not timed.
    pub check_every: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            hosts: 10_000,
            vms: 100_000,
            group_size: 10,
            seed: 1,
            check_every: 1_000,
        }
    }
}

/// What a run measured and found.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub hosts: usize,
    pub vms: usize,
    pub group_size: usize,
    pub placed: usize,
    pub refused: usize,
    /// Time spent in `Engine::place` calls only.
    pub seconds: f64,
    /// Placement calls (placed or refused) per second of `seconds`.
    pub per_second: f64,
    /// Hosts over effective capacity, anti-affinity pairs sharing a host,
    /// and placements that break their request's constraints.
    pub violations: usize,
    pub exactness_checked: usize,
    pub exactness_mismatches: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Every placement, in request order (`None`: refused).
    pub placements: Vec<Option<HostId>>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "placement: {} VMs onto {} hosts (anti-affinity groups of {}): placed {}, refused {}, \
             {:.3} s, {:.0} placements/s, p50 {:.1} µs, p99 {:.1} µs, violations {}, \
             exactness {} checked / {} mismatches",
            self.vms,
            self.hosts,
            self.group_size,
            self.placed,
            self.refused,
            self.seconds,
            self.per_second,
            self.p50_ns as f64 / 1000.0,
            self.p99_ns as f64 / 1000.0,
            self.violations,
            self.exactness_checked,
            self.exactness_mismatches,
        )
    }
}

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// (name, weigher, ratios).
const CLUSTERS: [(&str, Weigher, Ratios); 4] = [
    ("general", Weigher::Spread, Ratios::DEFAULT),
    (
        "dense",
        Weigher::Pack,
        Ratios {
            cpu_milli: 8000,
            ram_milli: 1200,
            disk_milli: 1000,
        },
    ),
    (
        "compute",
        Weigher::Spread,
        Ratios {
            cpu_milli: 2000,
            ram_milli: 1000,
            disk_milli: 1000,
        },
    ),
    (
        "archive",
        Weigher::Pack,
        Ratios {
            cpu_milli: 4000,
            ram_milli: 1000,
            disk_milli: 2000,
        },
    ),
];

const FLAVORS: [Resources; 4] = [
    Resources::new(1, 2 * GIB, 20 * GIB),
    Resources::new(2, 4 * GIB, 40 * GIB),
    Resources::new(4, 8 * GIB, 80 * GIB),
    Resources::new(8, 16 * GIB, 160 * GIB),
];

/// The fleet as the bench knows it, independent of the engine.
struct Fleet {
    hosts: Vec<HostSnapshot>,
    /// Index into [`CLUSTERS`] per host.
    cluster: Vec<usize>,
}

fn fleet(n: usize, rng: &mut StdRng) -> Fleet {
    let sizes = [
        Resources::new(32, 128 * GIB, 2048 * GIB),
        Resources::new(64, 256 * GIB, 4096 * GIB),
        Resources::new(96, 384 * GIB, 6144 * GIB),
        Resources::new(128, 512 * GIB, 8192 * GIB),
    ];
    let mut hosts = Vec::with_capacity(n);
    let mut cluster = Vec::with_capacity(n);
    for i in 0..n {
        let size_class = rng.random_range(0..sizes.len());
        let c = rng.random_range(0..CLUSTERS.len());
        let zone = ZONES[rng.random_range(0..ZONES.len())];
        let mut tags = Vec::new();
        if size_class > 0 || rng.random_bool(0.5) {
            tags.push("ssd".to_string());
        }
        if rng.random_bool(0.2) {
            tags.push("sriov".to_string());
        }
        if size_class == 3 && rng.random_bool(0.1) {
            tags.push("gpu".to_string());
        }
        let condition = match rng.random_range(0..100) {
            0 => HostCondition::Unreachable,
            1 => HostCondition::Maintenance,
            2 => HostCondition::Draining,
            _ => HostCondition::Up,
        };
        let capacity = sizes[size_class];
        // Already 0–25% full of 2 vCPU / 4 GiB / 40 GiB VMs.
        let effective = CLUSTERS[c].2.effective(capacity);
        let max_existing = effective.memory_bytes / (4 * GIB) / 4;
        let existing = rng.random_range(0..=max_existing);
        let allocated = Resources::new(2 * existing, 4 * GIB * existing, 40 * GIB * existing);
        hosts.push(HostSnapshot {
            id: HostId::from(Uuid::from_u128(rng.random())),
            name: format!("host-{i:05}"),
            zone: zone.to_string(),
            cluster: CLUSTERS[c].0.to_string(),
            condition,
            tags,
            capacity,
            allocated,
        });
        cluster.push(c);
    }
    Fleet { hosts, cluster }
}

fn workload(cfg: &BenchConfig, rng: &mut StdRng) -> Vec<Request> {
    let mut requests = Vec::with_capacity(cfg.vms);
    let mut template = Request::default();
    for i in 0..cfg.vms {
        let starts_group = cfg.group_size == 0 || i % cfg.group_size == 0;
        if starts_group {
            template = Request::default();
            match rng.random_range(0..100) {
                0..=54 => {}
                55..=69 => template.zone = Some(ZONES[rng.random_range(0..ZONES.len())].into()),
                70..=79 => template.require_tags = vec!["ssd".into()],
                80..=84 => template.require_tags = vec!["sriov".into()],
                85..=89 => {
                    template.cluster = Some(CLUSTERS[rng.random_range(0..CLUSTERS.len())].0.into())
                }
                90..=94 => template.forbid_tags = vec!["gpu".into()],
                95..=97 => template.require_tags = vec!["gpu".into()],
                _ => {
                    template.zone = Some(ZONES[rng.random_range(0..ZONES.len())].into());
                    template.require_tags = vec!["ssd".into()];
                }
            }
            template.group = (cfg.group_size > 0).then(|| {
                (
                    ServerGroupId::from(Uuid::from_u128(rng.random())),
                    GroupPolicy::AntiAffinity,
                )
            });
        }
        let mut req = template.clone();
        req.resources = FLAVORS[rng.random_range(0..FLAVORS.len())];
        requests.push(req);
    }
    requests
}

/// Builds the fleet and workload from the seed, places every VM, verifies.
pub fn run(cfg: &BenchConfig) -> BenchReport {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let fleet = fleet(cfg.hosts, &mut rng);
    let requests = workload(cfg, &mut rng);

    let mut engine = Engine::new();
    for (name, weigher, ratios) in CLUSTERS {
        engine.set_cluster_policy(name, ClusterPolicy { ratios, weigher });
    }
    for host in &fleet.hosts {
        engine.upsert_host(host.clone());
    }

    let mut placements = Vec::with_capacity(requests.len());
    let mut latencies = Vec::with_capacity(requests.len());
    let mut exactness_checked = 0;
    let mut exactness_mismatches = 0;
    for (i, req) in requests.iter().enumerate() {
        let expected =
            (cfg.check_every > 0 && i % cfg.check_every == 0).then(|| engine.explain(req).chosen);
        let start = Instant::now();
        let result = engine.place(req);
        let elapsed = start.elapsed();
        latencies.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        let placed = result.ok();
        if let Some(expected) = expected {
            exactness_checked += 1;
            if expected != placed {
                exactness_mismatches += 1;
            }
        }
        placements.push(placed);
    }

    let violations = verify(&fleet, &requests, &placements);
    let total_ns: u64 = latencies.iter().sum();
    let seconds = total_ns as f64 / 1e9;
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get(
                latencies
                    .len()
                    .saturating_sub(1)
                    .min(latencies.len() * p / 100),
            )
            .copied()
            .unwrap_or(0)
    };
    let placed = placements.iter().flatten().count();
    BenchReport {
        hosts: cfg.hosts,
        vms: cfg.vms,
        group_size: cfg.group_size,
        placed,
        refused: placements.len() - placed,
        seconds,
        per_second: if seconds > 0.0 {
            placements.len() as f64 / seconds
        } else {
            0.0
        },
        violations,
        exactness_checked,
        exactness_mismatches,
        p50_ns: percentile(50),
        p99_ns: percentile(99),
        placements,
    }
}

/// Counts violations from the fleet and the placements alone, without
/// asking the engine: capacity is recomputed from the ratios and the sum of
/// what was placed on each host.
fn verify(fleet: &Fleet, requests: &[Request], placements: &[Option<HostId>]) -> usize {
    let position: std::collections::HashMap<HostId, usize> = fleet
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.id, i))
        .collect();
    let mut allocated: Vec<[u128; 3]> = fleet
        .hosts
        .iter()
        .map(|h| {
            [
                u128::from(h.allocated.vcpus),
                u128::from(h.allocated.memory_bytes),
                u128::from(h.allocated.disk_bytes),
            ]
        })
        .collect();
    let mut violations = 0;
    let mut group_hosts = HashSet::new();
    for (req, placed) in requests.iter().zip(placements) {
        let Some(host_id) = placed else {
            continue;
        };
        let Some(&i) = position.get(host_id) else {
            violations += 1;
            continue;
        };
        let host = &fleet.hosts[i];
        let r = req.resources;
        allocated[i][0] += u128::from(r.vcpus);
        allocated[i][1] += u128::from(r.memory_bytes);
        allocated[i][2] += u128::from(r.disk_bytes);
        let breaks_constraints = host.condition != HostCondition::Up
            || req.zone.as_ref().is_some_and(|z| *z != host.zone)
            || req.cluster.as_ref().is_some_and(|c| *c != host.cluster)
            || req.require_tags.iter().any(|t| !host.tags.contains(t))
            || req.forbid_tags.iter().any(|t| host.tags.contains(t))
            || req.exclude_hosts.contains(host_id);
        if breaks_constraints {
            violations += 1;
        }
        if let Some((group, GroupPolicy::AntiAffinity)) = req.group {
            if !group_hosts.insert((group, i)) {
                violations += 1;
            }
        }
    }
    for (i, host) in fleet.hosts.iter().enumerate() {
        let ratios = CLUSTERS[fleet.cluster[i]].2;
        let cap = host.capacity;
        let limits = [
            u128::from(cap.vcpus) * u128::from(ratios.cpu_milli) / 1000,
            u128::from(cap.memory_bytes) * u128::from(ratios.ram_milli) / 1000,
            u128::from(cap.disk_bytes) * u128::from(ratios.disk_milli) / 1000,
        ];
        if allocated[i].iter().zip(limits).any(|(a, l)| *a > l) {
            violations += 1;
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_is_clean_exact_and_deterministic() {
        let cfg = BenchConfig {
            hosts: 300,
            vms: 3_000,
            group_size: 10,
            seed: 7,
            check_every: 1,
        };
        let a = run(&cfg);
        assert_eq!(a.violations, 0, "{a}");
        assert_eq!(a.exactness_checked, 3_000);
        assert_eq!(a.exactness_mismatches, 0, "{a}");
        assert!(a.placed > 0);
        let b = run(&cfg);
        assert_eq!(a.placements, b.placements, "same seed, same placements");
    }

    /// The full-size run; `cargo test -p stratus-placement --release --
    /// --ignored bench` prints its figures.
    #[test]
    #[ignore = "release-build benchmark"]
    fn bench_placement_full() {
        let report = run(&BenchConfig::default());
        println!("{report}");
        assert_eq!(report.violations, 0, "{report}");
        assert_eq!(report.exactness_mismatches, 0, "{report}");
        assert_eq!(report.refused, 0, "{report}");
        if !cfg!(debug_assertions) {
            assert!(report.per_second >= 100_000.0, "{report}");
        }
    }
}
