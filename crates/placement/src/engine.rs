//! The engine: the hosts' capacity held in ordered indexes, the exact choice
//! of a host for a request, and the full scan that explains a refusal.
//!
//! # Two paths, one answer
//!
//! [`Engine::choose`] walks ordered indexes and touches a handful of hosts;
//! [`Engine::explain`] scans every host, applying the filters in
//! [`Filter`] order and counting what each eliminated. Both apply the same
//! filters and the same preference order (see the crate doc), so the fast
//! path's pick always equals the scan's: the scan is the reference the bench
//! and the tests hold the fast path to.
//!
//! # Indexes
//!
//! Hosts are grouped into *partitions* by (zone, cluster, tag set), interned
//! to small integers. Within a partition, the hosts that are up sit in a
//! `BTreeSet` ordered best-first by the cluster's weigher:
//!
//! ```text
//!   spread:  (u64::MAX - free memory, host id)   -> first entry = most free
//!   pack:    (free memory, host id)              -> range from the request's
//!                                                   memory = tightest fit
//! ```
//!
//! A request keeps only the partitions whose zone, cluster and tags match
//! (whole partitions pass or fail those filters), walks each from its best
//! end, skips hosts that fail the remaining per-host filters (vCPUs, disk,
//! excluded, anti-affinity), and stops at the first that passes: it is that
//! partition's best. A walk also stops as soon as its entries cannot beat the
//! best found so far, and a spread walk stops when free memory drops below
//! the request. The partitions' bests then meet in the tournament.
//!
//! **Invariant**: a host is in exactly one partition's index iff it is up,
//! under the key computed from its current allocation, effective capacity and
//! its cluster's weigher. Every mutation removes the host's key before it
//! changes any of those and inserts the new key after.
//!
//! **Invariant**: a group's member map has no zero counts and no empty maps;
//! "the group has members" is "the group has a map".
//!
//! # Costs
//!
//! A placement costs O(matching partitions × log hosts + skipped hosts), or
//! O(member hosts) when a hard-affinity or soft-affinity group decides.
//! Skips are hosts with enough free memory but not enough vCPUs or disk,
//! hosts holding a member of the request's anti-affinity group (at most the
//! group's size) and excluded hosts. A fleet where every host has its own
//! tag set degenerates to a scan over partitions; real fleets have a few
//! dozen (the bench's has about 70). A refusal, and [`Engine::explain`],
//! cost a full scan: O(hosts).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use stratus_common::{HostId, ServerGroupId};

use crate::explain::{
    BatchNoFit, Elimination, Explanation, Filter, NearMiss, NoFit, Resource, Shortfall,
};
use crate::model::{ClusterPolicy, GroupPolicy, HostSnapshot, Request, Resources, Weigher};

/// Index entry: (order key, host id as a number, slot). The host id orders
/// ties the way [`HostId`]'s `Ord` does (big-endian bytes); the slot only
/// finds the host again and never decides an order (ids are unique).
type IndexKey = (u64, u128, u32);

/// Strings interned to dense integers, so the hot path compares integers.
#[derive(Clone, Debug, Default)]
struct Interner {
    ids: HashMap<String, u32>,
    count: u32,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.count;
        self.count += 1;
        self.ids.insert(s.to_string(), id);
        id
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

#[derive(Clone, Debug)]
struct HostEntry {
    snapshot: HostSnapshot,
    zone: u32,
    cluster: u32,
    /// Sorted, deduplicated.
    tags: Box<[u32]>,
    /// Physical capacity times the cluster's ratios.
    effective: Resources,
    /// The partition of its zone, cluster and tags, whether or not indexed.
    home: u32,
    /// In `partitions[home].index` (iff up).
    indexed: bool,
    /// Groups with a non-zero member count here, to clean up on removal.
    groups: Vec<ServerGroupId>,
}

impl HostEntry {
    fn free(&self) -> Resources {
        self.effective.saturating_sub(self.snapshot.allocated)
    }

    /// allocated + want ≤ effective, for all three resources.
    fn fits(&self, want: Resources) -> bool {
        self.snapshot
            .allocated
            .checked_add(want)
            .is_some_and(|total| total.fits_within(self.effective))
    }

    fn id_key(&self) -> u128 {
        self.snapshot.id.as_uuid().as_u128()
    }
}

#[derive(Clone, Debug)]
struct Partition {
    zone: u32,
    cluster: u32,
    tags: Box<[u32]>,
    weigher: Weigher,
    index: BTreeSet<IndexKey>,
}

fn order_key(weigher: Weigher, free_memory: u64) -> u64 {
    match weigher {
        Weigher::Spread => u64::MAX - free_memory,
        Weigher::Pack => free_memory,
    }
}

/// A feasible host as the preference order sees it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    slot: u32,
    id_key: u128,
    weigher: Weigher,
    /// Free effective memory once the VM is placed.
    free_after: u64,
    /// Effective memory capacity.
    effective: u64,
}

/// True if `a` is strictly preferred to `b`, both under `weigher`.
fn beats(weigher: Weigher, a: (u64, u128), b: (u64, u128)) -> bool {
    match weigher {
        Weigher::Spread => a.0 > b.0 || (a.0 == b.0 && a.1 < b.1),
        Weigher::Pack => a.0 < b.0 || (a.0 == b.0 && a.1 < b.1),
    }
}

/// The best spread host and the best pack host seen so far; see the crate
/// doc for how the two finalists meet.
#[derive(Clone, Copy, Debug, Default)]
struct Tournament {
    spread: Option<Candidate>,
    pack: Option<Candidate>,
}

impl Tournament {
    fn best(&self, weigher: Weigher) -> Option<Candidate> {
        match weigher {
            Weigher::Spread => self.spread,
            Weigher::Pack => self.pack,
        }
    }

    /// Could a host with this free-after and id still win its class?
    fn could_take(&self, weigher: Weigher, free_after: u64, id_key: u128) -> bool {
        self.best(weigher)
            .is_none_or(|b| beats(weigher, (free_after, id_key), (b.free_after, b.id_key)))
    }

    fn offer(&mut self, c: Candidate) {
        if self.could_take(c.weigher, c.free_after, c.id_key) {
            match c.weigher {
                Weigher::Spread => self.spread = Some(c),
                Weigher::Pack => self.pack = Some(c),
            }
        }
    }

    fn winner(&self) -> Option<Candidate> {
        match (self.spread, self.pack) {
            (Some(s), Some(p)) => {
                // Spread's score is the fraction of memory left free, pack's
                // the fraction used, both after placement; compared exactly
                // by cross-multiplying: free_s/eff_s vs used_p/eff_p.
                let used_p = p.effective.saturating_sub(p.free_after);
                let lhs = u128::from(s.free_after) * u128::from(p.effective);
                let rhs = u128::from(used_p) * u128::from(s.effective);
                Some(match lhs.cmp(&rhs) {
                    std::cmp::Ordering::Greater => s,
                    std::cmp::Ordering::Less => p,
                    std::cmp::Ordering::Equal if s.id_key < p.id_key => s,
                    std::cmp::Ordering::Equal => p,
                })
            }
            (s, p) => s.or(p),
        }
    }
}

/// Which member-count level a soft policy prefers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// Hard affinity: every member host is as good as another.
    Any,
    Fewest,
    Most,
}

/// Tracks the preferred member-count level and the tournament within it.
#[derive(Clone, Copy, Debug)]
struct LeveledTournament {
    level: Level,
    count: Option<u32>,
    tournament: Tournament,
}

impl LeveledTournament {
    fn new(level: Level) -> Self {
        Self {
            level,
            count: None,
            tournament: Tournament::default(),
        }
    }

    fn offer(&mut self, count: u32, c: Candidate) {
        let better_level = match (self.level, self.count) {
            (Level::Any, _) | (_, None) => None,
            (Level::Fewest, Some(cur)) => Some(count.cmp(&cur).reverse()),
            (Level::Most, Some(cur)) => Some(count.cmp(&cur)),
        };
        match better_level {
            Some(std::cmp::Ordering::Less) => {}
            Some(std::cmp::Ordering::Greater) => {
                self.count = Some(count);
                self.tournament = Tournament::default();
                self.tournament.offer(c);
            }
            Some(std::cmp::Ordering::Equal) | None => {
                self.count = Some(count);
                self.tournament.offer(c);
            }
        }
    }

    fn winner(&self) -> Option<Candidate> {
        self.tournament.winner()
    }
}

/// A request's zone, cluster and tags resolved to interned ids.
struct Query<'r> {
    req: &'r Request,
    zone: Option<u32>,
    cluster: Option<u32>,
    require: Vec<u32>,
    forbid: Vec<u32>,
}

impl Query<'_> {
    fn matches(&self, zone: u32, cluster: u32, tags: &[u32]) -> bool {
        self.zone.is_none_or(|z| z == zone)
            && self.cluster.is_none_or(|c| c == cluster)
            && self.require.iter().all(|t| tags.binary_search(t).is_ok())
            && !self.forbid.iter().any(|t| tags.binary_search(t).is_ok())
    }
}

/// What a full scan found.
struct Evaluation {
    eliminated: [usize; Filter::COUNT],
    feasible: usize,
    chosen: Option<Candidate>,
    near_misses: Vec<NearMiss>,
}

/// The placement engine. See the crate doc for what it decides and the
/// module doc for how.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    slots: Vec<Option<HostEntry>>,
    vacant: Vec<u32>,
    by_id: HashMap<HostId, u32>,
    zones: Interner,
    clusters: Interner,
    tags: Interner,
    /// By interned cluster id; clusters never given a policy hold the default.
    policies: Vec<ClusterPolicy>,
    partitions: Vec<Partition>,
    partition_ids: HashMap<(u32, u32, Box<[u32]>), u32>,
    /// Group -> slot -> member count (never zero, never an empty map).
    groups: HashMap<ServerGroupId, BTreeMap<u32, u32>>,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a cluster's overcommit ratios and weigher, re-indexing its hosts
    /// (their effective capacity and their order change with it). The
    /// cluster need not have hosts yet.
    pub fn set_cluster_policy(&mut self, cluster: &str, policy: ClusterPolicy) {
        let c = self.cluster_id(cluster);
        let members: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| match e {
                Some(e) if e.cluster == c => u32::try_from(slot).ok(),
                _ => None,
            })
            .collect();
        for &slot in &members {
            self.unindex(slot);
        }
        self.policies[c as usize] = policy;
        for p in self.partitions.iter_mut().filter(|p| p.cluster == c) {
            p.weigher = policy.weigher;
        }
        for &slot in &members {
            if let Some(e) = self.entry_mut(slot) {
                e.effective = policy.ratios.effective(e.snapshot.capacity);
            }
            self.index(slot);
        }
    }

    /// The policy in force for a cluster (the default if none was set).
    pub fn cluster_policy(&self, cluster: &str) -> ClusterPolicy {
        self.clusters
            .get(cluster)
            .and_then(|c| self.policies.get(c as usize).copied())
            .unwrap_or_default()
    }

    /// Inserts a host or replaces everything the engine knows of it
    /// (capacity, allocation, state, location, tags). Its server-group
    /// member counts are kept: they describe VMs, not the host.
    pub fn upsert_host(&mut self, host: HostSnapshot) {
        let slot = match self.by_id.get(&host.id) {
            Some(&slot) => {
                self.unindex(slot);
                slot
            }
            None => {
                let slot = match self.vacant.pop() {
                    Some(slot) => slot,
                    None => {
                        self.slots.push(None);
                        // More than 4 billion hosts is not a fleet we serve.
                        u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                self.by_id.insert(host.id, slot);
                slot
            }
        };
        let zone = self.zones.intern(&host.zone);
        let cluster = self.cluster_id(&host.cluster);
        let mut tags: Vec<u32> = host.tags.iter().map(|t| self.tags.intern(t)).collect();
        tags.sort_unstable();
        tags.dedup();
        let tags = tags.into_boxed_slice();
        let home = self.partition_id(zone, cluster, &tags);
        let effective = self.policies[cluster as usize]
            .ratios
            .effective(host.capacity);
        let groups = self
            .entry(slot)
            .map(|e| e.groups.clone())
            .unwrap_or_default();
        self.slots[slot as usize] = Some(HostEntry {
            snapshot: host,
            zone,
            cluster,
            tags,
            effective,
            home,
            indexed: false,
            groups,
        });
        self.index(slot);
    }

    /// Forgets a host, its allocation and its group member counts. If it
    /// comes back, load its counts again with
    /// [`Engine::set_group_member_count`].
    pub fn remove_host(&mut self, id: HostId) {
        let Some(slot) = self.by_id.remove(&id) else {
            return;
        };
        self.unindex(slot);
        if let Some(entry) = self.slots[slot as usize].take() {
            for group in entry.groups {
                self.forget_member(group, slot);
            }
        }
        self.vacant.push(slot);
    }

    /// The host as the engine sees it now, allocation included.
    pub fn host(&self, id: HostId) -> Option<HostSnapshot> {
        self.slot_of(id)
            .and_then(|slot| self.entry(slot))
            .map(|e| e.snapshot.clone())
    }

    /// The host's capacity after its cluster's overcommit ratios.
    pub fn effective_capacity(&self, id: HostId) -> Option<Resources> {
        self.slot_of(id)
            .and_then(|slot| self.entry(slot))
            .map(|e| e.effective)
    }

    pub fn host_count(&self) -> usize {
        self.by_id.len()
    }

    /// Every host, ordered by id.
    pub fn hosts(&self) -> Vec<HostSnapshot> {
        let mut hosts: Vec<HostSnapshot> = self
            .slots
            .iter()
            .flatten()
            .map(|e| e.snapshot.clone())
            .collect();
        hosts.sort_by_key(|h| h.id);
        hosts
    }

    /// Sets how many members of `group` run on `host`, as loaded from the
    /// store. Unknown hosts are ignored: load hosts first.
    pub fn set_group_member_count(&mut self, group: ServerGroupId, host: HostId, members: u32) {
        if let Some(slot) = self.slot_of(host) {
            self.set_member_count(group, slot, members);
        }
    }

    /// How many members of `group` the engine counts on `host`.
    pub fn group_member_count(&self, group: ServerGroupId, host: HostId) -> u32 {
        self.slot_of(host)
            .map(|slot| self.member_count(group, slot))
            .unwrap_or(0)
    }

    /// The host the request would go to, or why none can take it. Read-only
    /// and exact: the answer equals the full scan's ([`Engine::explain`]).
    pub fn choose(&self, req: &Request) -> Result<HostId, NoFit> {
        match self.choose_fast(req) {
            Some(c) => self
                .entry(c.slot)
                .map(|e| e.snapshot.id)
                .ok_or_else(|| self.no_fit(req)),
            None => Err(self.no_fit(req)),
        }
    }

    /// Counts the request on `host`: its resources join the allocation and,
    /// if it names a group, the host gains a member. Nothing is checked: the
    /// caller commits what [`Engine::choose`] returned, or what the store
    /// says is already there. Unknown hosts are ignored.
    pub fn commit(&mut self, host: HostId, req: &Request) {
        let Some(slot) = self.slot_of(host) else {
            return;
        };
        self.reallocate(slot, |allocated| allocated.saturating_add(req.resources));
        if let Some((group, _)) = req.group {
            let count = self.member_count(group, slot);
            self.set_member_count(group, slot, count.saturating_add(1));
        }
    }

    /// The inverse of [`Engine::commit`], for a VM deleted or a claim rolled
    /// back. Saturates at zero rather than trusting the caller's arithmetic.
    pub fn release(&mut self, host: HostId, resources: Resources, group: Option<ServerGroupId>) {
        let Some(slot) = self.slot_of(host) else {
            return;
        };
        self.reallocate(slot, |allocated| allocated.saturating_sub(resources));
        if let Some(group) = group {
            let count = self.member_count(group, slot);
            self.set_member_count(group, slot, count.saturating_sub(1));
        }
    }

    /// Whether `host` can take the request, by the same filters as
    /// [`Engine::choose`]: `Err` names the first that rules it out (an
    /// unknown host is [`Filter::State`]). How an operator's named host (a
    /// migration's destination) is still checked.
    pub fn check_host(&self, host: HostId, req: &Request) -> Result<(), Filter> {
        let Some(slot) = self.slot_of(host) else {
            return Err(Filter::State);
        };
        let Some(e) = self.entry(slot) else {
            return Err(Filter::State);
        };
        let members = req.group.and_then(|(g, _)| self.groups.get(&g));
        let count = members.and_then(|m| m.get(&slot).copied()).unwrap_or(0);
        match first_failing_filter(e, req, req.group.map(|(_, p)| p), members.is_some(), count) {
            None => Ok(()),
            Some(f) => Err(f),
        }
    }

    /// [`Engine::choose`], then [`Engine::commit`] on the chosen host.
    pub fn place(&mut self, req: &Request) -> Result<HostId, NoFit> {
        let host = self.choose(req)?;
        self.commit(host, req);
        Ok(host)
    }

    /// Places every request in order, each seeing the ones before it (so
    /// members of one anti-affinity group land on distinct hosts). All or
    /// nothing: if one cannot be placed, the ones before it are released
    /// and the engine is as it was.
    pub fn place_batch(&mut self, reqs: &[Request]) -> Result<Vec<HostId>, BatchNoFit> {
        let mut placed = Vec::with_capacity(reqs.len());
        for (index, req) in reqs.iter().enumerate() {
            match self.place(req) {
                Ok(host) => placed.push(host),
                Err(reason) => {
                    for (host, req) in placed.iter().zip(reqs).rev() {
                        self.release(*host, req.resources, req.group.map(|(g, _)| g));
                    }
                    return Err(BatchNoFit {
                        index,
                        placed_before: placed.len(),
                        reason,
                    });
                }
            }
        }
        Ok(placed)
    }

    /// A dry run by full scan: where the request would go, how many hosts
    /// each filter eliminated, and the closest near misses. O(hosts).
    pub fn explain(&self, req: &Request) -> Explanation {
        let eval = self.evaluate(req);
        let chosen = eval.chosen.and_then(|c| self.entry(c.slot));
        Explanation {
            chosen: chosen.map(|e| e.snapshot.id),
            chosen_name: chosen.map(|e| e.snapshot.name.clone()),
            hosts_total: self.host_count(),
            feasible: eval.feasible,
            eliminated: eliminations(&eval.eliminated),
            near_misses: eval.near_misses,
        }
    }

    // ---- the fast path ----

    fn choose_fast(&self, req: &Request) -> Option<Candidate> {
        let q = self.query(req)?;
        let members = req.group.and_then(|(g, _)| self.groups.get(&g));
        match req.group.map(|(_, policy)| policy) {
            None => self.best_indexed(&q, None),
            Some(GroupPolicy::AntiAffinity) => self.best_indexed(&q, members),
            Some(GroupPolicy::Affinity) => match members {
                Some(m) => self.best_member(&q, m, Level::Any),
                None => self.best_indexed(&q, None),
            },
            Some(GroupPolicy::SoftAntiAffinity) => self
                .best_indexed(&q, members)
                .or_else(|| members.and_then(|m| self.best_member(&q, m, Level::Fewest))),
            Some(GroupPolicy::SoftAffinity) => members
                .and_then(|m| self.best_member(&q, m, Level::Most))
                .or_else(|| self.best_indexed(&q, None)),
        }
    }

    /// Resolves names to interned ids; `None` if the request names a zone,
    /// cluster or required tag no host has ever had, so nothing can match.
    fn query<'r>(&self, req: &'r Request) -> Option<Query<'r>> {
        let zone = match &req.zone {
            Some(z) => Some(self.zones.get(z)?),
            None => None,
        };
        let cluster = match &req.cluster {
            Some(c) => Some(self.clusters.get(c)?),
            None => None,
        };
        let require = req
            .require_tags
            .iter()
            .map(|t| self.tags.get(t))
            .collect::<Option<Vec<u32>>>()?;
        let forbid = req
            .forbid_tags
            .iter()
            .filter_map(|t| self.tags.get(t))
            .collect();
        Some(Query {
            req,
            zone,
            cluster,
            require,
            forbid,
        })
    }

    /// The best host over the matching partitions, skipping hosts in `skip`
    /// (an anti-affinity group's members).
    fn best_indexed(&self, q: &Query<'_>, skip: Option<&BTreeMap<u32, u32>>) -> Option<Candidate> {
        let memory = q.req.resources.memory_bytes;
        let mut t = Tournament::default();
        for p in &self.partitions {
            if p.index.is_empty() || !q.matches(p.zone, p.cluster, &p.tags) {
                continue;
            }
            match p.weigher {
                Weigher::Spread => self.walk(p.index.iter(), p.weigher, q, skip, &mut t),
                Weigher::Pack => {
                    self.walk(p.index.range((memory, 0, 0)..), p.weigher, q, skip, &mut t)
                }
            }
        }
        t.winner()
    }

    /// Offers `t` the first entry of one partition's walk that passes the
    /// per-host filters. Entries come best first: once one cannot fit or
    /// cannot beat the best so far, no later one can.
    fn walk<'a>(
        &self,
        entries: impl Iterator<Item = &'a IndexKey>,
        weigher: Weigher,
        q: &Query<'_>,
        skip: Option<&BTreeMap<u32, u32>>,
        t: &mut Tournament,
    ) {
        let want = q.req.resources;
        let memory = want.memory_bytes;
        for &(key, id_key, slot) in entries {
            let free = match weigher {
                Weigher::Spread => u64::MAX - key,
                Weigher::Pack => key,
            };
            if free < memory || !t.could_take(weigher, free - memory, id_key) {
                return;
            }
            if skip.is_some_and(|s| s.contains_key(&slot)) {
                continue;
            }
            let Some(e) = self.entry(slot) else {
                continue;
            };
            if !e.fits(want) || q.req.exclude_hosts.contains(&e.snapshot.id) {
                continue;
            }
            t.offer(Candidate {
                slot,
                id_key,
                weigher,
                free_after: free - memory,
                effective: e.effective.memory_bytes,
            });
            return;
        }
    }

    /// The best among a group's member hosts, at the preferred count level.
    fn best_member(
        &self,
        q: &Query<'_>,
        members: &BTreeMap<u32, u32>,
        level: Level,
    ) -> Option<Candidate> {
        let mut t = LeveledTournament::new(level);
        for (&slot, &count) in members {
            let Some(e) = self.entry(slot) else {
                continue;
            };
            if !e.indexed
                || !q.matches(e.zone, e.cluster, &e.tags)
                || q.req.exclude_hosts.contains(&e.snapshot.id)
                || !e.fits(q.req.resources)
            {
                continue;
            }
            t.offer(count, self.candidate(slot, e, q.req.resources));
        }
        t.winner()
    }

    fn candidate(&self, slot: u32, e: &HostEntry, want: Resources) -> Candidate {
        Candidate {
            slot,
            id_key: e.id_key(),
            weigher: self.policies[e.cluster as usize].weigher,
            free_after: e.free().memory_bytes.saturating_sub(want.memory_bytes),
            effective: e.effective.memory_bytes,
        }
    }

    // ---- the full scan ----

    fn no_fit(&self, req: &Request) -> NoFit {
        let eval = self.evaluate(req);
        debug_assert!(
            eval.chosen.is_none(),
            "the fast path refused what the scan would place"
        );
        NoFit {
            hosts_total: self.host_count(),
            eliminated: eliminations(&eval.eliminated),
            near_misses: eval.near_misses,
        }
    }

    /// Every host through every filter, by the snapshot's own strings (not
    /// the interned ids the fast path uses), then the same preference.
    fn evaluate(&self, req: &Request) -> Evaluation {
        let want = req.resources;
        let members = req.group.and_then(|(g, _)| self.groups.get(&g));
        let policy = req.group.map(|(_, p)| p);
        let mut eliminated = [0usize; Filter::COUNT];
        let mut feasible = 0;
        let mut pick = LeveledTournament::new(match policy {
            Some(GroupPolicy::SoftAntiAffinity) => Level::Fewest,
            Some(GroupPolicy::SoftAffinity) => Level::Most,
            _ => Level::Any,
        });
        let mut near: Vec<((u128, usize, u128), NearMiss)> = Vec::new();
        for (slot, e) in self.slots.iter().enumerate() {
            let Some(e) = e else {
                continue;
            };
            let Ok(slot) = u32::try_from(slot) else {
                continue;
            };
            let count = members.and_then(|m| m.get(&slot).copied()).unwrap_or(0);
            match first_failing_filter(e, req, policy, members.is_some(), count) {
                None => {
                    feasible += 1;
                    pick.offer(count, self.candidate(slot, e, want));
                }
                Some(filter) => {
                    eliminated[filter.index()] += 1;
                    if matches!(filter, Filter::Vcpus | Filter::Memory | Filter::Disk) {
                        near.push(near_miss(e, want));
                    }
                }
            }
        }
        near.sort_unstable_by_key(|(key, _)| *key);
        near.truncate(3);
        Evaluation {
            eliminated,
            feasible,
            chosen: pick.winner(),
            near_misses: near.into_iter().map(|(_, n)| n).collect(),
        }
    }

    // ---- bookkeeping ----

    fn slot_of(&self, id: HostId) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    fn entry(&self, slot: u32) -> Option<&HostEntry> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut HostEntry> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    fn cluster_id(&mut self, name: &str) -> u32 {
        let c = self.clusters.intern(name);
        if self.policies.len() <= c as usize {
            self.policies
                .resize(c as usize + 1, ClusterPolicy::default());
        }
        c
    }

    fn partition_id(&mut self, zone: u32, cluster: u32, tags: &[u32]) -> u32 {
        let key = (zone, cluster, Box::<[u32]>::from(tags));
        if let Some(&id) = self.partition_ids.get(&key) {
            return id;
        }
        let id = u32::try_from(self.partitions.len()).unwrap_or(u32::MAX);
        self.partitions.push(Partition {
            zone,
            cluster,
            tags: key.2.clone(),
            weigher: self.policies[cluster as usize].weigher,
            index: BTreeSet::new(),
        });
        self.partition_ids.insert(key, id);
        id
    }

    fn index_key(&self, slot: u32, e: &HostEntry) -> IndexKey {
        let weigher = self.partitions[e.home as usize].weigher;
        (order_key(weigher, e.free().memory_bytes), e.id_key(), slot)
    }

    /// Takes the host out of its partition's index (before any change to
    /// what its key is computed from).
    fn unindex(&mut self, slot: u32) {
        let Some(e) = self.entry(slot) else {
            return;
        };
        if !e.indexed {
            return;
        }
        let key = self.index_key(slot, e);
        let home = e.home as usize;
        self.partitions[home].index.remove(&key);
        if let Some(e) = self.entry_mut(slot) {
            e.indexed = false;
        }
    }

    /// Puts the host in its partition's index if it is up.
    fn index(&mut self, slot: u32) {
        let Some(e) = self.entry(slot) else {
            return;
        };
        if e.indexed || !e.snapshot.condition.is_schedulable() {
            return;
        }
        let key = self.index_key(slot, e);
        let home = e.home as usize;
        self.partitions[home].index.insert(key);
        if let Some(e) = self.entry_mut(slot) {
            e.indexed = true;
        }
    }

    fn reallocate(&mut self, slot: u32, f: impl FnOnce(Resources) -> Resources) {
        self.unindex(slot);
        if let Some(e) = self.entry_mut(slot) {
            e.snapshot.allocated = f(e.snapshot.allocated);
        }
        self.index(slot);
    }

    fn member_count(&self, group: ServerGroupId, slot: u32) -> u32 {
        self.groups
            .get(&group)
            .and_then(|m| m.get(&slot).copied())
            .unwrap_or(0)
    }

    fn set_member_count(&mut self, group: ServerGroupId, slot: u32, count: u32) {
        let Some(e) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        if count == 0 {
            e.groups.retain(|g| *g != group);
            self.forget_member(group, slot);
        } else if self
            .groups
            .entry(group)
            .or_default()
            .insert(slot, count)
            .is_none()
        {
            e.groups.push(group);
        }
    }

    fn forget_member(&mut self, group: ServerGroupId, slot: u32) {
        if let Some(m) = self.groups.get_mut(&group) {
            m.remove(&slot);
            if m.is_empty() {
                self.groups.remove(&group);
            }
        }
    }
}

/// The first filter, in [`Filter`] order, that eliminates the host; `None`
/// if the host can take the request.
fn first_failing_filter(
    e: &HostEntry,
    req: &Request,
    policy: Option<GroupPolicy>,
    group_has_members: bool,
    count: u32,
) -> Option<Filter> {
    let host = &e.snapshot;
    let free_enough = |allocated: u64, want: u64, effective: u64| {
        allocated
            .checked_add(want)
            .is_some_and(|total| total <= effective)
    };
    if !host.condition.is_schedulable() {
        Some(Filter::State)
    } else if req.zone.as_ref().is_some_and(|z| *z != host.zone) {
        Some(Filter::Zone)
    } else if req.cluster.as_ref().is_some_and(|c| *c != host.cluster) {
        Some(Filter::Cluster)
    } else if req.require_tags.iter().any(|t| !host.tags.contains(t)) {
        Some(Filter::RequiredTags)
    } else if req.forbid_tags.iter().any(|t| host.tags.contains(t)) {
        Some(Filter::ForbiddenTags)
    } else if req.exclude_hosts.contains(&host.id) {
        Some(Filter::Excluded)
    } else if policy == Some(GroupPolicy::Affinity) && group_has_members && count == 0 {
        Some(Filter::Affinity)
    } else if policy == Some(GroupPolicy::AntiAffinity) && count > 0 {
        Some(Filter::AntiAffinity)
    } else if !free_enough(host.allocated.vcpus, req.resources.vcpus, e.effective.vcpus) {
        Some(Filter::Vcpus)
    } else if !free_enough(
        host.allocated.memory_bytes,
        req.resources.memory_bytes,
        e.effective.memory_bytes,
    ) {
        Some(Filter::Memory)
    } else if !free_enough(
        host.allocated.disk_bytes,
        req.resources.disk_bytes,
        e.effective.disk_bytes,
    ) {
        Some(Filter::Disk)
    } else {
        None
    }
}

/// The host's shortfalls and its rank among near misses: the largest
/// relative shortfall ((needed − available) / needed, as a 64.64 fixed-point
/// number so the order is total and exact enough), then fewer resources
/// lacking, then the host id.
fn near_miss(e: &HostEntry, want: Resources) -> ((u128, usize, u128), NearMiss) {
    let free = e.free();
    let mut lacking = Vec::new();
    let mut worst = 0u128;
    for (resource, needed, available, allocated, effective) in [
        (
            Resource::Vcpus,
            want.vcpus,
            free.vcpus,
            e.snapshot.allocated.vcpus,
            e.effective.vcpus,
        ),
        (
            Resource::Memory,
            want.memory_bytes,
            free.memory_bytes,
            e.snapshot.allocated.memory_bytes,
            e.effective.memory_bytes,
        ),
        (
            Resource::Disk,
            want.disk_bytes,
            free.disk_bytes,
            e.snapshot.allocated.disk_bytes,
            e.effective.disk_bytes,
        ),
    ] {
        let fits = allocated
            .checked_add(needed)
            .is_some_and(|total| total <= effective);
        if fits {
            continue;
        }
        let relative = if needed == 0 {
            0
        } else {
            (u128::from(needed.saturating_sub(available)) << 64) / u128::from(needed)
        };
        worst = worst.max(relative);
        lacking.push(Shortfall {
            resource,
            needed,
            available,
        });
    }
    let key = (worst, lacking.len(), e.id_key());
    (
        key,
        NearMiss {
            host: e.snapshot.id,
            name: e.snapshot.name.clone(),
            lacking,
        },
    )
}

fn eliminations(counts: &[usize; Filter::COUNT]) -> Vec<Elimination> {
    Filter::ALL
        .iter()
        .zip(counts)
        .filter(|(_, &n)| n > 0)
        .map(|(&filter, &hosts)| Elimination { filter, hosts })
        .collect()
}
