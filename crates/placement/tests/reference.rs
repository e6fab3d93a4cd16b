//! A brute-force reference placer written from the crate doc's rules alone
//! (plain structures, a scan of every host, no indexes), and property tests
//! that hold the engine to it over random fleets and random call sequences:
//! the same pick at every step, capacity within the ratios, hard group
//! policies honoured, and the same placements whatever the insertion order.

use std::collections::BTreeMap;

use proptest::prelude::*;
use stratus_common::{HostId, ServerGroupId};
use stratus_placement::{
    ClusterPolicy, Engine, Filter, GroupPolicy, HostCondition, HostSnapshot, Ratios, Request,
    Resources, Weigher,
};
use uuid::Uuid;

const ZONES: [&str; 2] = ["z1", "z2"];
const CLUSTERS: [&str; 3] = ["c1", "c2", "c3"];
const TAGS: [&str; 3] = ["ssd", "gpu", "sriov"];
/// Group i has policy GROUP_POLICIES[i].
const GROUP_POLICIES: [GroupPolicy; 5] = [
    GroupPolicy::Affinity,
    GroupPolicy::AntiAffinity,
    GroupPolicy::SoftAffinity,
    GroupPolicy::SoftAntiAffinity,
    GroupPolicy::AntiAffinity,
];
/// Small units so ties and exact fits are common.
const UNIT: u64 = 1 << 30;

fn group_id(i: usize) -> ServerGroupId {
    ServerGroupId::from(Uuid::from_u128(1000 + i as u128))
}

// ---- the reference ----

#[derive(Clone, Debug, Default)]
struct Reference {
    hosts: BTreeMap<HostId, HostSnapshot>,
    policies: BTreeMap<String, ClusterPolicy>,
    members: BTreeMap<(ServerGroupId, HostId), u32>,
}

impl Reference {
    fn policy(&self, cluster: &str) -> ClusterPolicy {
        self.policies.get(cluster).copied().unwrap_or_default()
    }

    fn effective(&self, h: &HostSnapshot) -> [u128; 3] {
        let r = self.policy(&h.cluster).ratios;
        [
            u128::from(h.capacity.vcpus) * u128::from(r.cpu_milli) / 1000,
            u128::from(h.capacity.memory_bytes) * u128::from(r.ram_milli) / 1000,
            u128::from(h.capacity.disk_bytes) * u128::from(r.disk_milli) / 1000,
        ]
        .map(|v| v.min(u128::from(u64::MAX)))
    }

    fn count(&self, group: ServerGroupId, host: HostId) -> u32 {
        self.members.get(&(group, host)).copied().unwrap_or(0)
    }

    fn group_has_members(&self, group: ServerGroupId) -> bool {
        self.members.keys().any(|(g, _)| *g == group)
    }

    /// The first failing filter, or None if the host fits.
    fn check(&self, h: &HostSnapshot, req: &Request) -> Option<Filter> {
        let eff = self.effective(h);
        let alloc = [
            h.allocated.vcpus,
            h.allocated.memory_bytes,
            h.allocated.disk_bytes,
        ];
        let want = [
            req.resources.vcpus,
            req.resources.memory_bytes,
            req.resources.disk_bytes,
        ];
        let fits = |i: usize| u128::from(alloc[i]) + u128::from(want[i]) <= eff[i];
        let (policy, count, has_members) = match req.group {
            Some((g, p)) => (Some(p), self.count(g, h.id), self.group_has_members(g)),
            None => (None, 0, false),
        };
        if h.condition != HostCondition::Up {
            Some(Filter::State)
        } else if req.zone.as_ref().is_some_and(|z| *z != h.zone) {
            Some(Filter::Zone)
        } else if req.cluster.as_ref().is_some_and(|c| *c != h.cluster) {
            Some(Filter::Cluster)
        } else if !req.require_tags.iter().all(|t| h.tags.contains(t)) {
            Some(Filter::RequiredTags)
        } else if req.forbid_tags.iter().any(|t| h.tags.contains(t)) {
            Some(Filter::ForbiddenTags)
        } else if req.exclude_hosts.contains(&h.id) {
            Some(Filter::Excluded)
        } else if policy == Some(GroupPolicy::Affinity) && has_members && count == 0 {
            Some(Filter::Affinity)
        } else if policy == Some(GroupPolicy::AntiAffinity) && count > 0 {
            Some(Filter::AntiAffinity)
        } else if !fits(0) {
            Some(Filter::Vcpus)
        } else if !fits(1) {
            Some(Filter::Memory)
        } else if !fits(2) {
            Some(Filter::Disk)
        } else {
            None
        }
    }

    /// Per-filter counts (index = filter position) and the pick.
    fn pick(&self, req: &Request) -> (Vec<usize>, Option<HostId>) {
        let mut counts = vec![0; Filter::ALL.len()];
        let mut feasible: Vec<&HostSnapshot> = Vec::new();
        for h in self.hosts.values() {
            match self.check(h, req) {
                Some(f) => counts[Filter::ALL.iter().position(|x| *x == f).unwrap_or(0)] += 1,
                None => feasible.push(h),
            }
        }
        // Soft policies: keep the preferred member-count level.
        if let Some((g, p)) = req.group {
            let counts_of = |h: &&HostSnapshot| self.count(g, h.id);
            let level = match p {
                GroupPolicy::SoftAntiAffinity => feasible.iter().map(counts_of).min(),
                GroupPolicy::SoftAffinity => feasible.iter().map(counts_of).max(),
                _ => None,
            };
            if let Some(level) = level {
                feasible.retain(|h| self.count(g, h.id) == level);
            }
        }
        let m = u128::from(req.resources.memory_bytes);
        // (free after, effective memory, id) per host, split by weigher.
        let scored = |w: Weigher| {
            feasible
                .iter()
                .filter(move |h| self.policy(&h.cluster).weigher == w)
                .map(|h| {
                    let eff = self.effective(h)[1];
                    (eff - u128::from(h.allocated.memory_bytes) - m, eff, h.id)
                })
        };
        let spread = scored(Weigher::Spread).min_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
        let pack = scored(Weigher::Pack).min_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        let chosen = match (spread, pack) {
            (Some(s), Some(p)) => {
                // free_s / eff_s against used_p / eff_p.
                let lhs = s.0 * p.1;
                let rhs = (p.1 - p.0) * s.1;
                Some(if lhs > rhs || (lhs == rhs && s.2 < p.2) {
                    s.2
                } else {
                    p.2
                })
            }
            (s, p) => s.or(p).map(|x| x.2),
        };
        (counts, chosen)
    }

    fn commit(&mut self, host: HostId, req: &Request) {
        if let Some(h) = self.hosts.get_mut(&host) {
            h.allocated = h.allocated.saturating_add(req.resources);
        }
        if let Some((g, _)) = req.group {
            *self.members.entry((g, host)).or_default() += 1;
        }
    }

    fn release(&mut self, host: HostId, req: &Request) {
        if let Some(h) = self.hosts.get_mut(&host) {
            h.allocated = h.allocated.saturating_sub(req.resources);
        }
        if let Some((g, _)) = req.group {
            if let Some(c) = self.members.get_mut(&(g, host)) {
                *c -= 1;
                if *c == 0 {
                    self.members.remove(&(g, host));
                }
            }
        }
    }

    fn remove(&mut self, host: HostId) {
        self.hosts.remove(&host);
        self.members.retain(|(_, h), _| *h != host);
    }
}

// ---- random fleets and call sequences ----

fn host_strategy() -> impl Strategy<Value = HostSnapshot> {
    (
        any::<u128>(),
        0..ZONES.len(),
        0..CLUSTERS.len(),
        prop_oneof![
            8 => Just(HostCondition::Up),
            1 => Just(HostCondition::Unreachable),
            1 => Just(HostCondition::Maintenance),
            1 => Just(HostCondition::Draining),
        ],
        proptest::collection::vec(0..TAGS.len(), 0..3),
        (0u64..24, 0u64..24, 0u64..24),
        (0u64..12, 0u64..12, 0u64..12),
    )
        .prop_map(|(id, z, c, condition, tags, cap, alloc)| HostSnapshot {
            id: HostId::from(Uuid::from_u128(id)),
            name: format!("h{id:x}"),
            zone: ZONES[z].into(),
            cluster: CLUSTERS[c].into(),
            condition,
            tags: tags.into_iter().map(|t| TAGS[t].to_string()).collect(),
            capacity: Resources::new(cap.0, cap.1 * UNIT, cap.2 * UNIT),
            allocated: Resources::new(alloc.0, alloc.1 * UNIT, alloc.2 * UNIT),
        })
}

fn policy_strategy() -> impl Strategy<Value = ClusterPolicy> {
    (
        prop_oneof![Just(1000u32), Just(4000), 500u32..8000],
        prop_oneof![Just(1000u32), 500u32..2000],
        prop_oneof![Just(1000u32), 500u32..2000],
        prop_oneof![Just(Weigher::Spread), Just(Weigher::Pack)],
    )
        .prop_map(|(cpu, ram, disk, weigher)| ClusterPolicy {
            ratios: Ratios {
                cpu_milli: cpu,
                ram_milli: ram,
                disk_milli: disk,
            },
            weigher,
        })
}

/// A request; `exclude` picks a host by position among the fleet (modulo).
fn request_strategy() -> impl Strategy<Value = (Request, Option<usize>)> {
    (
        (0u64..6, 0u64..6, 0u64..6),
        proptest::option::weighted(0.2, 0..ZONES.len()),
        proptest::option::weighted(0.2, 0..CLUSTERS.len()),
        proptest::option::weighted(0.2, 0..TAGS.len()),
        proptest::option::weighted(0.2, 0..TAGS.len()),
        proptest::option::weighted(0.6, 0..GROUP_POLICIES.len()),
        proptest::option::weighted(0.1, any::<usize>()),
    )
        .prop_map(|(r, zone, cluster, require, forbid, group, exclude)| {
            let req = Request {
                resources: Resources::new(r.0, r.1 * UNIT, r.2 * UNIT),
                zone: zone.map(|z| ZONES[z].into()),
                cluster: cluster.map(|c| CLUSTERS[c].into()),
                require_tags: require.map(|t| vec![TAGS[t].into()]).unwrap_or_default(),
                forbid_tags: forbid.map(|t| vec![TAGS[t].into()]).unwrap_or_default(),
                group: group.map(|g| (group_id(g), GROUP_POLICIES[g])),
                exclude_hosts: vec![],
            };
            (req, exclude)
        })
}

#[derive(Clone, Debug)]
enum Op {
    Place(Request, Option<usize>),
    Batch(Vec<(Request, Option<usize>)>),
    /// Release the n-th live placement (modulo).
    Release(usize),
    SetPolicy(usize, ClusterPolicy),
    /// Replace the n-th host (modulo) with new state, tags and capacity.
    Upsert(usize, HostSnapshot),
    Remove(usize),
    /// Load a member count from "the store".
    SetMembers(usize, usize, u32),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => request_strategy().prop_map(|(r, x)| Op::Place(r, x)),
        2 => proptest::collection::vec(request_strategy(), 1..5).prop_map(Op::Batch),
        3 => any::<usize>().prop_map(Op::Release),
        1 => (0..CLUSTERS.len(), policy_strategy()).prop_map(|(c, p)| Op::SetPolicy(c, p)),
        1 => (any::<usize>(), host_strategy()).prop_map(|(i, h)| Op::Upsert(i, h)),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => (0..GROUP_POLICIES.len(), any::<usize>(), 0u32..3)
            .prop_map(|(g, h, n)| Op::SetMembers(g, h, n)),
    ]
}

fn fleet_strategy() -> impl Strategy<Value = (Vec<HostSnapshot>, Vec<(usize, ClusterPolicy)>)> {
    (
        proptest::collection::vec(host_strategy(), 0..24),
        proptest::collection::vec((0..CLUSTERS.len(), policy_strategy()), 0..4),
    )
        .prop_map(|(mut hosts, policies)| {
            hosts.sort_by_key(|h| h.id);
            hosts.dedup_by_key(|h| h.id);
            (hosts, policies)
        })
}

/// Runs the ops on an engine and the reference side by side, checking each
/// step; returns every placement outcome in order.
fn run(
    hosts: &[HostSnapshot],
    policies: &[(usize, ClusterPolicy)],
    ops: &[Op],
    reverse_insert: bool,
) -> Result<Vec<Option<HostId>>, TestCaseError> {
    let mut engine = Engine::new();
    let mut reference = Reference::default();
    let mut ordered: Vec<&HostSnapshot> = hosts.iter().collect();
    if reverse_insert {
        ordered.reverse();
    }
    // Policies first for half the fleet, after the hosts for the rest, so
    // both "policy then host" and re-indexing paths run.
    let (early, late) = policies.split_at(policies.len() / 2);
    for (c, p) in early {
        engine.set_cluster_policy(CLUSTERS[*c], *p);
        reference.policies.insert(CLUSTERS[*c].into(), *p);
    }
    for h in ordered {
        engine.upsert_host(h.clone());
        reference.hosts.insert(h.id, h.clone());
    }
    for (c, p) in late {
        engine.set_cluster_policy(CLUSTERS[*c], *p);
        reference.policies.insert(CLUSTERS[*c].into(), *p);
    }

    let mut live: Vec<(HostId, Request)> = Vec::new();
    let mut outcomes = Vec::new();
    let host_at = |r: &Reference, i: usize| -> Option<HostId> {
        let n = r.hosts.len();
        (n > 0)
            .then(|| r.hosts.keys().nth(i % n).copied())
            .flatten()
    };

    for op in ops {
        match op {
            Op::Place(req, exclude) => {
                let mut req = req.clone();
                if let Some(x) = exclude.and_then(|i| host_at(&reference, i)) {
                    req.exclude_hosts.push(x);
                }
                let (counts, expected) = reference.pick(&req);
                let explanation = engine.explain(&req);
                let got = engine.place(&req);
                prop_assert_eq!(got.as_ref().ok().copied(), expected, "pick for {:?}", req);
                prop_assert_eq!(explanation.chosen, expected);
                let mut engine_counts = vec![0; Filter::ALL.len()];
                for e in &explanation.eliminated {
                    prop_assert!(e.hosts > 0);
                    engine_counts[Filter::ALL.iter().position(|f| *f == e.filter).unwrap_or(0)] =
                        e.hosts;
                }
                prop_assert_eq!(&engine_counts, &counts);
                prop_assert_eq!(
                    engine_counts.iter().sum::<usize>() + explanation.feasible,
                    reference.hosts.len()
                );
                match got {
                    Ok(host) => {
                        check_placement(&reference, host, &req)?;
                        reference.commit(host, &req);
                        live.push((host, req));
                    }
                    Err(no_fit) => {
                        prop_assert_eq!(no_fit.eliminated, explanation.eliminated);
                        prop_assert_eq!(no_fit.near_misses, explanation.near_misses);
                        prop_assert!(explanation.feasible == 0);
                    }
                }
                outcomes.push(expected);
            }
            Op::Batch(reqs) => {
                let reqs: Vec<Request> = reqs
                    .iter()
                    .map(|(r, x)| {
                        let mut r = r.clone();
                        if let Some(x) = x.and_then(|i| host_at(&reference, i)) {
                            r.exclude_hosts.push(x);
                        }
                        r
                    })
                    .collect();
                let mut trial = reference.clone();
                let mut expected = Ok(Vec::new());
                for (i, r) in reqs.iter().enumerate() {
                    match trial.pick(r).1 {
                        Some(h) => {
                            check_placement(&trial, h, r)?;
                            trial.commit(h, r);
                            if let Ok(v) = expected.as_mut() {
                                v.push(h);
                            }
                        }
                        None => {
                            expected = Err(i);
                            break;
                        }
                    }
                }
                let before = engine.hosts();
                let got = engine.place_batch(&reqs);
                match (&got, &expected) {
                    (Ok(got), Ok(want)) => {
                        prop_assert_eq!(got, want);
                        reference = trial;
                        for (h, r) in got.iter().zip(&reqs) {
                            live.push((*h, r.clone()));
                        }
                    }
                    (Err(err), Err(index)) => {
                        prop_assert_eq!(err.index, *index);
                        prop_assert_eq!(err.placed_before, *index);
                        prop_assert_eq!(engine.hosts(), before, "batch rolled back");
                    }
                    _ => prop_assert!(false, "batch: engine {:?}, reference {:?}", got, expected),
                }
                outcomes.extend(got.ok().unwrap_or_default().into_iter().map(Some));
            }
            Op::Release(i) => {
                if !live.is_empty() {
                    let (host, req) = live.remove(i % live.len());
                    engine.release(host, req.resources, req.group.map(|(g, _)| g));
                    reference.release(host, &req);
                }
            }
            Op::SetPolicy(c, p) => {
                engine.set_cluster_policy(CLUSTERS[*c], *p);
                reference.policies.insert(CLUSTERS[*c].into(), *p);
            }
            Op::Upsert(i, h) => {
                if let Some(id) = host_at(&reference, *i) {
                    let h = HostSnapshot { id, ..h.clone() };
                    engine.upsert_host(h.clone());
                    reference.hosts.insert(id, h);
                    // Old claims no longer describe this host's allocation.
                    live.retain(|(host, _)| *host != id);
                }
            }
            Op::Remove(i) => {
                if let Some(id) = host_at(&reference, *i) {
                    engine.remove_host(id);
                    reference.remove(id);
                    live.retain(|(host, _)| *host != id);
                }
            }
            Op::SetMembers(g, i, n) => {
                if let Some(id) = host_at(&reference, *i) {
                    let g = group_id(*g);
                    engine.set_group_member_count(g, id, *n);
                    if *n == 0 {
                        reference.members.remove(&(g, id));
                    } else {
                        reference.members.insert((g, id), *n);
                    }
                    // Counts loaded from the store replace what claims added.
                    live.retain(|(host, r)| *host != id || r.group.map(|x| x.0) != Some(g));
                }
            }
        }
        // The engine's view of every host matches the reference's.
        prop_assert_eq!(engine.host_count(), reference.hosts.len());
        for (id, h) in &reference.hosts {
            prop_assert_eq!(engine.host(*id), Some(h.clone()));
        }
        for ((g, h), n) in &reference.members {
            prop_assert_eq!(engine.group_member_count(*g, *h), *n);
        }
    }
    Ok(outcomes)
}

/// Invariants of a placement, checked on the state before it is committed.
fn check_placement(r: &Reference, host: HostId, req: &Request) -> Result<(), TestCaseError> {
    let h = r
        .hosts
        .get(&host)
        .ok_or_else(|| TestCaseError::fail("unknown host"))?;
    let eff = r.effective(h);
    let after = h.allocated.saturating_add(req.resources);
    prop_assert!(u128::from(after.vcpus) <= eff[0], "vCPUs over the ratio");
    prop_assert!(
        u128::from(after.memory_bytes) <= eff[1],
        "memory over the ratio"
    );
    prop_assert!(
        u128::from(after.disk_bytes) <= eff[2],
        "disk over the ratio"
    );
    prop_assert_eq!(h.condition, HostCondition::Up);
    if let Some((g, policy)) = req.group {
        match policy {
            GroupPolicy::AntiAffinity => prop_assert_eq!(r.count(g, host), 0),
            GroupPolicy::Affinity if r.group_has_members(g) => {
                prop_assert!(r.count(g, host) > 0)
            }
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_reference_at_every_step(
        (hosts, policies) in fleet_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        let first = run(&hosts, &policies, &ops, false)?;
        let again = run(&hosts, &policies, &ops, false)?;
        prop_assert_eq!(&first, &again, "same inputs, same placements");
        let reversed = run(&hosts, &policies, &ops, true)?;
        prop_assert_eq!(&first, &reversed, "insertion order does not matter");
    }
}

/// A dense fleet where most hosts tie, to stress the tie-breaks and the
/// spread/pack meeting.
#[test]
fn ties_and_mixed_weighers_match_the_reference_on_a_grid() {
    let mut engine = Engine::new();
    let mut reference = Reference::default();
    for (c, w) in [("c1", Weigher::Spread), ("c2", Weigher::Pack)] {
        let p = ClusterPolicy {
            weigher: w,
            ..ClusterPolicy::default()
        };
        engine.set_cluster_policy(c, p);
        reference.policies.insert(c.into(), p);
    }
    for i in 0..40u128 {
        let h = HostSnapshot {
            id: HostId::from(Uuid::from_u128(i * 7919 % 101)),
            name: format!("h{i}"),
            zone: "z1".into(),
            cluster: if i % 3 == 0 { "c2" } else { "c1" }.into(),
            condition: HostCondition::Up,
            tags: vec![],
            capacity: Resources::new(8, (4 + (i as u64 % 3) * 4) * UNIT, 100 * UNIT),
            allocated: Resources::ZERO,
        };
        engine.upsert_host(h.clone());
        reference.hosts.insert(h.id, h);
    }
    let sizes = [1u64, 2, 3, 1, 4, 2];
    for step in 0..400 {
        let req = Request::new(Resources::new(1, sizes[step % sizes.len()] * UNIT, UNIT));
        let expected = reference.pick(&req).1;
        assert_eq!(engine.place(&req).ok(), expected, "step {step}");
        match expected {
            Some(h) => reference.commit(h, &req),
            None => break,
        }
    }
}
