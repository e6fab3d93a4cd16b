//! Unit tests of the engine's public behaviour: each filter, each weigher,
//! each group policy, ratios, explanations, batches, host changes.

use stratus_common::bytes::GIB;
use stratus_common::{HostId, ServerGroupId};
use stratus_placement::{
    ClusterPolicy, Elimination, Engine, Filter, GroupPolicy, HostCondition, HostSnapshot, Ratios,
    Request, Resource, Resources, Weigher,
};
use uuid::Uuid;

/// Host ids that sort by `n`, so tie-break expectations are readable.
fn id(n: u128) -> HostId {
    HostId::from(Uuid::from_u128(n))
}

fn group(n: u128) -> ServerGroupId {
    ServerGroupId::from(Uuid::from_u128(n))
}

/// A 16 vCPU / 64 GiB / 1 TiB host, up, in zone-a / c1, no tags, empty.
fn host(n: u128) -> HostSnapshot {
    HostSnapshot {
        id: id(n),
        name: format!("host-{n}"),
        zone: "zone-a".into(),
        cluster: "c1".into(),
        condition: HostCondition::Up,
        tags: vec![],
        capacity: Resources::new(16, 64 * GIB, 1024 * GIB),
        allocated: Resources::ZERO,
    }
}

fn vm(vcpus: u64, mem_gib: u64) -> Request {
    Request::new(Resources::new(vcpus, mem_gib * GIB, 10 * GIB))
}

fn engine_with(hosts: impl IntoIterator<Item = HostSnapshot>) -> Engine {
    let mut e = Engine::new();
    for h in hosts {
        e.upsert_host(h);
    }
    e
}

fn count(eliminated: &[Elimination], filter: Filter) -> usize {
    eliminated
        .iter()
        .find(|e| e.filter == filter)
        .map(|e| e.hosts)
        .unwrap_or(0)
}

/// Choose, and check the full scan agrees, as every test should.
fn choose(e: &Engine, req: &Request) -> Option<HostId> {
    let fast = e.choose(req).ok();
    assert_eq!(fast, e.explain(req).chosen, "fast path and scan disagree");
    fast
}

#[test]
fn resources_arithmetic_saturates() {
    let a = Resources::new(1, 2, 3);
    let b = Resources::new(2, 2, 2);
    assert_eq!(a + b, Resources::new(3, 4, 5));
    assert_eq!(a - b, Resources::new(0, 0, 1));
    assert_eq!(
        Resources::new(u64::MAX, 0, 0) + a,
        Resources::new(u64::MAX, 2, 3)
    );
    assert_eq!(Resources::new(u64::MAX, 0, 0).checked_add(a), None);
    assert!(a.fits_within(Resources::new(1, 2, 3)));
    assert!(!b.fits_within(a));
}

#[test]
fn ratios_scale_physical_capacity_rounding_down() {
    let r = Ratios {
        cpu_milli: 1500,
        ram_milli: 999,
        disk_milli: 2000,
    };
    assert_eq!(
        r.effective(Resources::new(3, 1000, 7)),
        Resources::new(4, 999, 14)
    );
    assert_eq!(
        Ratios::default().effective(Resources::new(16, 64, 1)),
        Resources::new(64, 64, 1)
    );
    // 128-bit intermediate, pinned at u64::MAX.
    assert_eq!(
        r.effective(Resources::new(u64::MAX, u64::MAX, u64::MAX)),
        Resources::new(u64::MAX, u64::MAX - u64::MAX / 1000 - 1, u64::MAX)
    );
}

#[test]
fn policy_words_round_trip() {
    for w in Weigher::ALL {
        assert_eq!(w.as_str().parse::<Weigher>(), Ok(*w));
    }
    for p in GroupPolicy::ALL {
        assert_eq!(p.as_str().parse::<GroupPolicy>(), Ok(*p));
        let json = serde_json::to_string(p).expect("serializes");
        assert_eq!(json, format!("\"{}\"", p.as_str()));
    }
    for c in HostCondition::ALL {
        assert_eq!(c.as_str().parse::<HostCondition>(), Ok(*c));
    }
    assert_eq!(Weigher::default(), Weigher::Spread);
    assert_eq!(GroupPolicy::SoftAntiAffinity.as_str(), "soft-anti-affinity");
    let err = "scatter".parse::<Weigher>().expect_err("unknown word");
    assert_eq!(
        err.to_string(),
        "unknown weigher \"scatter\" (expected one of: spread, pack)"
    );
}

#[test]
fn only_up_hosts_are_chosen() {
    let conditions = [
        HostCondition::Unreachable,
        HostCondition::Maintenance,
        HostCondition::Draining,
    ];
    let mut hosts: Vec<HostSnapshot> = conditions
        .iter()
        .enumerate()
        .map(|(i, c)| HostSnapshot {
            condition: *c,
            ..host(i as u128 + 1)
        })
        .collect();
    let e = engine_with(hosts.clone());
    let no_fit = e.choose(&vm(1, 1)).expect_err("nothing is up");
    assert_eq!(no_fit.hosts_total, 3);
    assert_eq!(
        no_fit.eliminated,
        vec![Elimination {
            filter: Filter::State,
            hosts: 3
        }]
    );
    hosts.push(host(9));
    let e = engine_with(hosts);
    assert_eq!(choose(&e, &vm(1, 1)), Some(id(9)));
}

#[test]
fn zone_and_cluster_restrict() {
    let e = engine_with([
        host(1),
        HostSnapshot {
            zone: "zone-b".into(),
            ..host(2)
        },
        HostSnapshot {
            cluster: "c2".into(),
            ..host(3)
        },
    ]);
    let mut req = vm(1, 1);
    req.zone = Some("zone-b".into());
    assert_eq!(choose(&e, &req), Some(id(2)));
    req.zone = None;
    req.cluster = Some("c2".into());
    assert_eq!(choose(&e, &req), Some(id(3)));
    req.zone = Some("zone-b".into());
    let no_fit = e.choose(&req).expect_err("zone-b has no c2 host");
    assert_eq!(count(&no_fit.eliminated, Filter::Zone), 2);
    assert_eq!(count(&no_fit.eliminated, Filter::Cluster), 1);
    req.zone = Some("nowhere".into());
    let no_fit = e.choose(&req).expect_err("unknown zone");
    assert_eq!(count(&no_fit.eliminated, Filter::Zone), 3);
}

#[test]
fn required_and_forbidden_tags() {
    let e = engine_with([
        HostSnapshot {
            tags: vec!["ssd".into()],
            ..host(1)
        },
        HostSnapshot {
            tags: vec!["ssd".into(), "gpu".into()],
            ..host(2)
        },
        host(3),
    ]);
    let mut req = vm(1, 1);
    req.require_tags = vec!["ssd".into()];
    req.forbid_tags = vec!["gpu".into()];
    assert_eq!(choose(&e, &req), Some(id(1)));
    req.forbid_tags.clear();
    req.require_tags = vec!["gpu".into(), "ssd".into()];
    assert_eq!(choose(&e, &req), Some(id(2)));
    req.require_tags = vec!["nvme".into()];
    let no_fit = e.choose(&req).expect_err("no host has nvme");
    assert_eq!(count(&no_fit.eliminated, Filter::RequiredTags), 3);
    req.require_tags.clear();
    req.forbid_tags = vec!["ssd".into(), "unknown".into()];
    assert_eq!(choose(&e, &req), Some(id(3)));
    req.exclude_hosts = vec![id(3)];
    let no_fit = e.choose(&req).expect_err("host 3 excluded");
    assert_eq!(count(&no_fit.eliminated, Filter::ForbiddenTags), 2);
    assert_eq!(count(&no_fit.eliminated, Filter::Excluded), 1);
}

#[test]
fn excluded_hosts_are_skipped() {
    let e = engine_with([host(1), host(2)]);
    let mut req = vm(1, 1);
    assert_eq!(choose(&e, &req), Some(id(1)), "tie goes to the lowest id");
    req.exclude_hosts = vec![id(1)];
    assert_eq!(choose(&e, &req), Some(id(2)));
}

#[test]
fn each_capacity_filter_eliminates() {
    let e = engine_with([host(1)]); // effective 64 vCPU, 64 GiB, 1 TiB
    let cases = [
        (Resources::new(65, GIB, GIB), Filter::Vcpus),
        (Resources::new(1, 65 * GIB, GIB), Filter::Memory),
        (Resources::new(1, GIB, 1025 * GIB), Filter::Disk),
    ];
    for (resources, filter) in cases {
        let no_fit = e.choose(&Request::new(resources)).expect_err("too big");
        assert_eq!(
            no_fit.eliminated,
            vec![Elimination { filter, hosts: 1 }],
            "{resources:?}"
        );
    }
    assert_eq!(
        choose(&e, &Request::new(Resources::new(64, 64 * GIB, 1024 * GIB))),
        Some(id(1)),
        "exactly full fits"
    );
}

#[test]
fn overcommit_ratio_changes_reindex() {
    let mut e = engine_with([host(1)]);
    let big = vm(1, 96);
    assert!(e.choose(&big).is_err());
    e.set_cluster_policy(
        "c1",
        ClusterPolicy {
            ratios: Ratios {
                ram_milli: 1500,
                ..Ratios::DEFAULT
            },
            weigher: Weigher::Spread,
        },
    );
    assert_eq!(
        e.effective_capacity(id(1)).map(|r| r.memory_bytes),
        Some(96 * GIB)
    );
    assert_eq!(e.place(&big), Ok(id(1)));
    // Lowering the ratio below the allocation leaves the host full, not
    // broken.
    e.set_cluster_policy("c1", ClusterPolicy::default());
    let no_fit = e
        .choose(&vm(0, 0))
        .expect_err("over-allocated host is full");
    assert_eq!(count(&no_fit.eliminated, Filter::Memory), 1);
    // A policy set before any host of the cluster exists applies to it later.
    e.set_cluster_policy(
        "c9",
        ClusterPolicy {
            ratios: Ratios {
                cpu_milli: 1000,
                ..Ratios::DEFAULT
            },
            weigher: Weigher::Pack,
        },
    );
    e.upsert_host(HostSnapshot {
        cluster: "c9".into(),
        ..host(2)
    });
    assert_eq!(e.effective_capacity(id(2)).map(|r| r.vcpus), Some(16));
    assert_eq!(e.cluster_policy("c9").weigher, Weigher::Pack);
    assert_eq!(e.cluster_policy("never-set"), ClusterPolicy::default());
}

fn allocated(n: u128, mem_gib: u64) -> HostSnapshot {
    HostSnapshot {
        allocated: Resources::new(0, mem_gib * GIB, 0),
        ..host(n)
    }
}

#[test]
fn spread_prefers_the_most_free_memory() {
    let e = engine_with([allocated(1, 40), allocated(2, 10), allocated(3, 30)]);
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(2)));
    let e = engine_with([allocated(5, 10), allocated(4, 10)]);
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(4)), "tie: lowest id");
}

#[test]
fn pack_prefers_the_tightest_fit() {
    let mut e = Engine::new();
    e.set_cluster_policy(
        "c1",
        ClusterPolicy {
            weigher: Weigher::Pack,
            ..ClusterPolicy::default()
        },
    );
    for h in [
        allocated(1, 40),
        allocated(2, 62),
        allocated(3, 58),
        allocated(4, 58),
    ] {
        e.upsert_host(h);
    }
    // Host 2 has 2 GiB free: too little for 4 GiB. Hosts 3 and 4 tie at 6.
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(3)));
    assert_eq!(choose(&e, &vm(1, 2)), Some(id(2)));
    // Filling host 3 leaves host 4 the tightest fit for 4 GiB.
    assert_eq!(e.place(&vm(1, 4)), Ok(id(3)));
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(4)));
    assert_eq!(
        choose(&e, &vm(1, 1)),
        Some(id(2)),
        "2 GiB free each: lowest id"
    );
}

#[test]
fn spread_and_pack_clusters_meet_on_their_own_scores() {
    let mut e = Engine::new();
    e.set_cluster_policy(
        "packed",
        ClusterPolicy {
            weigher: Weigher::Pack,
            ..ClusterPolicy::default()
        },
    );
    // Spread host: 64 GiB, 32 used. Pack host: 64 GiB, 44 used.
    e.upsert_host(allocated(1, 32));
    e.upsert_host(HostSnapshot {
        cluster: "packed".into(),
        ..allocated(2, 44)
    });
    // 4 GiB: spread scores 28/64 free, pack 48/64 used: pack wins.
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(2)));
    // Empty the spread host: 60/64 free beats 48/64 used.
    e.upsert_host(host(1));
    assert_eq!(choose(&e, &vm(1, 4)), Some(id(1)));
    // Equal scores (32/64 free vs 32/64 used): lowest id.
    let mut e2 = e.clone();
    e2.upsert_host(allocated(1, 28));
    e2.upsert_host(HostSnapshot {
        cluster: "packed".into(),
        ..allocated(2, 28)
    });
    assert_eq!(choose(&e2, &vm(1, 4)), Some(id(1)));
}

#[test]
fn hard_anti_affinity_never_doubles_up() {
    let mut e = engine_with([host(1), host(2), host(3)]);
    let mut req = vm(1, 1);
    req.group = Some((group(7), GroupPolicy::AntiAffinity));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(e.place(&req).expect("a free host remains"));
    }
    seen.sort();
    assert_eq!(seen, vec![id(1), id(2), id(3)]);
    let no_fit = e.place(&req).expect_err("every host holds a member");
    assert_eq!(
        no_fit.eliminated,
        vec![Elimination {
            filter: Filter::AntiAffinity,
            hosts: 3
        }]
    );
    // Another group is unaffected.
    req.group = Some((group(8), GroupPolicy::AntiAffinity));
    assert!(e.place(&req).is_ok());
}

#[test]
fn hard_affinity_follows_the_first_member() {
    let mut e = engine_with([host(1), allocated(2, 60), host(3)]);
    let mut req = vm(1, 2);
    req.group = Some((group(1), GroupPolicy::Affinity));
    let first = e.place(&req).expect("first member goes anywhere");
    assert_eq!(first, id(1));
    for _ in 0..31 {
        assert_eq!(e.place(&req), Ok(id(1)));
    }
    // Host 1 is full (64 GiB); the group refuses rather than splits.
    let no_fit = e.place(&req).expect_err("host 1 is full");
    assert_eq!(count(&no_fit.eliminated, Filter::Affinity), 2);
    assert_eq!(count(&no_fit.eliminated, Filter::Memory), 1);
    assert_eq!(no_fit.near_misses.len(), 1);
    assert_eq!(no_fit.near_misses[0].host, id(1));
    // Members loaded from the store count the same way.
    let mut req = vm(1, 1);
    req.group = Some((group(2), GroupPolicy::Affinity));
    e.set_group_member_count(group(2), id(2), 3);
    assert_eq!(choose(&e, &req), Some(id(2)));
    assert_eq!(e.group_member_count(group(2), id(2)), 3);
}

#[test]
fn soft_anti_affinity_prefers_fewest_members_but_never_refuses() {
    let mut e = engine_with([host(1), host(2)]);
    let mut req = vm(1, 1);
    req.group = Some((group(3), GroupPolicy::SoftAntiAffinity));
    let a = e.place(&req).expect("fits");
    let b = e.place(&req).expect("fits");
    assert_ne!(a, b, "spread over both hosts first");
    e.set_group_member_count(group(3), id(1), 5);
    assert_eq!(choose(&e, &req), Some(id(2)), "fewest members");
    // Even against the weigher: host 2 much fuller, still preferred.
    e.upsert_host(allocated(2, 50));
    assert_eq!(choose(&e, &req), Some(id(2)));
    // Host 2 full: doubles up on host 1 instead of refusing.
    e.upsert_host(allocated(2, 64));
    assert_eq!(choose(&e, &req), Some(id(1)));
}

#[test]
fn soft_affinity_prefers_most_members_but_never_refuses() {
    let mut e = engine_with([host(1), host(2), host(3)]);
    let mut req = vm(1, 16);
    req.group = Some((group(4), GroupPolicy::SoftAffinity));
    e.set_group_member_count(group(4), id(3), 1);
    e.set_group_member_count(group(4), id(2), 2);
    assert_eq!(e.place(&req), Ok(id(2)), "most members");
    assert_eq!(e.place(&req), Ok(id(2)));
    assert_eq!(e.place(&req), Ok(id(2)));
    assert_eq!(e.place(&req), Ok(id(2)));
    // Host 2 full (64 GiB): next most members.
    assert_eq!(e.place(&req), Ok(id(3)));
    // Members only on full or excluded hosts: anywhere else.
    req.exclude_hosts = vec![id(3)];
    assert_eq!(e.place(&req), Ok(id(1)));
}

#[test]
fn explanation_counts_every_host_once_in_filter_order() {
    let e = engine_with([
        HostSnapshot {
            condition: HostCondition::Draining,
            zone: "zone-b".into(),
            ..host(1)
        },
        HostSnapshot {
            zone: "zone-b".into(),
            ..host(2)
        },
        HostSnapshot {
            zone: "zone-b".into(),
            ..host(3)
        },
        allocated(4, 62),
        allocated(5, 61),
        HostSnapshot {
            allocated: Resources::new(63, 61 * GIB, 0),
            ..host(6)
        },
        host(7),
    ]);
    let mut req = vm(2, 4);
    req.zone = Some("zone-a".into());
    let x = e.explain(&req);
    assert_eq!(x.chosen, Some(id(7)));
    assert_eq!(x.chosen_name.as_deref(), Some("host-7"));
    assert_eq!(x.hosts_total, 7);
    assert_eq!(x.feasible, 1);
    assert_eq!(
        x.eliminated,
        vec![
            Elimination {
                filter: Filter::State,
                hosts: 1
            },
            Elimination {
                filter: Filter::Zone,
                hosts: 2
            },
            Elimination {
                filter: Filter::Vcpus,
                hosts: 1
            },
            Elimination {
                filter: Filter::Memory,
                hosts: 2
            },
        ]
    );
    let total: usize = x.eliminated.iter().map(|e| e.hosts).sum();
    assert_eq!(total, x.hosts_total - x.feasible);
    assert_eq!(
        x.to_string(),
        "would place on host-7: 1 of 7 hosts fit; 1 is not up, 2 are in another zone, \
         1 lacks vCPUs, 2 lack memory"
    );

    req.exclude_hosts = vec![id(7)];
    let no_fit = e.choose(&req).expect_err("only host 7 fit");
    assert_eq!(count(&no_fit.eliminated, Filter::Excluded), 1);
    // Near misses, smallest relative shortfall first. host-5: 1 of 4 GiB
    // short (25%). host-4: 2 of 4 GiB short (50%). host-6: 1 of 2 vCPUs
    // (50%) and 1 of 4 GiB (25%) short: worst 50%, two resources, last.
    let names: Vec<&str> = no_fit.near_misses.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, vec!["host-5", "host-4", "host-6"]);
    assert_eq!(no_fit.near_misses[2].lacking.len(), 2);
    assert_eq!(no_fit.near_misses[2].lacking[0].resource, Resource::Vcpus);
    assert_eq!(
        no_fit.to_string(),
        "no host can take this VM: of 7 hosts, 1 is not up, 2 are in another zone, \
         1 is excluded, 1 lacks vCPUs, 2 lack memory; \
         closest: host-5 (needs 4.0 GiB memory, has 3.0 GiB free)"
    );
    assert_eq!(e.explain(&req).no_fit(), Some(no_fit.clone()));

    let json = serde_json::to_value(&no_fit).expect("serializes");
    assert_eq!(json["eliminated"][0]["filter"], "state");
    assert_eq!(json["near_misses"][0]["lacking"][0]["resource"], "memory");
    assert_eq!(json["near_misses"][0]["lacking"][0]["needed"], 4 * GIB);
}

#[test]
fn near_misses_are_at_most_three_closest_first() {
    let hosts = (1..=6).map(|n| allocated(n, 64 - n as u64)); // n GiB free
    let e = engine_with(hosts);
    let no_fit = e.choose(&vm(1, 8)).expect_err("nothing has 8 GiB");
    let near: Vec<HostId> = no_fit.near_misses.iter().map(|n| n.host).collect();
    assert_eq!(near, vec![id(6), id(5), id(4)]);
    assert_eq!(no_fit.near_misses[0].lacking[0].available, 6 * GIB);
}

#[test]
fn batch_is_all_or_nothing() {
    let mut e = engine_with([host(1), host(2), host(3)]);
    e.set_group_member_count(group(9), id(2), 1);
    let before = e.hosts();
    let mut req = vm(4, 8);
    req.group = Some((group(5), GroupPolicy::AntiAffinity));
    let batch = vec![req.clone(); 4];
    let err = e.place_batch(&batch).expect_err("only three hosts");
    assert_eq!(err.index, 3);
    assert_eq!(err.placed_before, 3);
    assert_eq!(count(&err.reason.eliminated, Filter::AntiAffinity), 3);
    assert_eq!(e.hosts(), before, "allocation rolled back");
    for n in 1..=3 {
        assert_eq!(e.group_member_count(group(5), id(n)), 0);
    }
    assert_eq!(e.group_member_count(group(9), id(2)), 1);
    let placed = e.place_batch(&batch[..3]).expect("three fit");
    let mut sorted = placed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "members of one batch honour anti-affinity");
    assert_eq!(
        err.to_string(),
        "request 3 of the batch cannot be placed; the 3 placed before it were rolled back"
    );
    assert_eq!(e.place_batch(&[]), Ok(vec![]));
}

#[test]
fn upsert_replaces_and_remove_forgets() {
    let mut e = engine_with([host(1), host(2)]);
    assert_eq!(e.host_count(), 2);
    let mut req = vm(1, 1);
    req.group = Some((group(6), GroupPolicy::AntiAffinity));
    assert_eq!(e.place(&req), Ok(id(1)));
    assert_eq!(
        e.host(id(1)).map(|h| h.allocated),
        Some(Resources::new(1, GIB, 10 * GIB))
    );
    // Upsert replaces state and allocation but keeps group members.
    e.upsert_host(HostSnapshot {
        condition: HostCondition::Maintenance,
        ..host(2)
    });
    assert_eq!(e.host(id(1)).map(|h| h.allocated.vcpus), Some(1));
    let no_fit = e.choose(&req).expect_err("1 holds a member, 2 is down");
    assert_eq!(count(&no_fit.eliminated, Filter::State), 1);
    assert_eq!(count(&no_fit.eliminated, Filter::AntiAffinity), 1);
    e.upsert_host(host(1));
    assert_eq!(e.host(id(1)).map(|h| h.allocated), Some(Resources::ZERO));
    assert_eq!(e.group_member_count(group(6), id(1)), 1);
    // Removal forgets the host and its members.
    e.remove_host(id(1));
    assert_eq!(e.host_count(), 1);
    assert_eq!(e.host(id(1)), None);
    e.upsert_host(host(1));
    assert_eq!(e.group_member_count(group(6), id(1)), 0);
    assert_eq!(choose(&e, &req), Some(id(1)));
    // Unknown hosts are ignored everywhere.
    e.remove_host(id(99));
    e.commit(id(99), &req);
    e.release(id(99), req.resources, None);
    e.set_group_member_count(group(6), id(99), 1);
    assert_eq!(e.host_count(), 2);
}

#[test]
fn release_is_the_inverse_of_commit_and_saturates() {
    let mut e = engine_with([host(1)]);
    let mut req = vm(2, 8);
    req.group = Some((group(1), GroupPolicy::AntiAffinity));
    e.commit(id(1), &req);
    assert_eq!(e.group_member_count(group(1), id(1)), 1);
    e.release(id(1), req.resources, Some(group(1)));
    assert_eq!(e.host(id(1)), Some(host(1)));
    assert_eq!(e.group_member_count(group(1), id(1)), 0);
    e.release(id(1), req.resources, Some(group(1)));
    assert_eq!(e.host(id(1)), Some(host(1)), "saturates at zero");
    assert_eq!(choose(&e, &req), Some(id(1)));
}

#[test]
fn empty_engine_refuses_with_a_message() {
    let e = Engine::new();
    let no_fit = e.choose(&vm(1, 1)).expect_err("no hosts");
    assert_eq!(no_fit.hosts_total, 0);
    assert_eq!(
        no_fit.to_string(),
        "no host can take this VM: there are no hosts"
    );
}
