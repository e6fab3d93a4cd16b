//! Pure VM placement: given a request and the hosts' capacity, return a host
//! or a reasoned refusal. No I/O, no async, no database types: the controller
//! loads an [`Engine`] from the store, asks it, and writes the claim.
//!
//! # What fits
//!
//! A host can take a request when it passes every [`Filter`], in this order:
//!
//! 1. **State**: only [`HostCondition::Up`] hosts take VMs.
//! 2. **Zone**, **cluster**: if the request names one, hosts elsewhere fail.
//! 3. **Tags**: the host carries every required tag and no forbidden one.
//! 4. **Excluded**: the host is not in the request's exclusion list (a
//!    migration's source).
//! 5. **Server groups**, hard policies only. Anti-affinity: the host holds no
//!    member of the group. Affinity: if the group has members on any host the
//!    engine knows (up or not), the host holds at least one; a group without
//!    members goes anywhere. Soft policies never eliminate a host.
//! 6. **Capacity**: `allocated + request ≤ effective` for vCPUs, memory and
//!    disk, where `effective = physical × ratio / 1000` with the cluster's
//!    [`Ratios`] (integer math in 128 bits, rounded down; defaults CPU 4.0,
//!    memory 1.0, disk 1.0).
//!
//! # Which host wins
//!
//! Among the hosts that fit, the engine picks by one deterministic order:
//!
//! 1. **Soft group policy**: soft anti-affinity keeps only the hosts with the
//!    fewest members of the group, soft affinity those with the most.
//! 2. **The cluster's weigher**, on one key, free effective memory after
//!    placement (memory is the resource that cannot be overcommitted and the
//!    one that runs out first). Spread: the most free wins. Pack: the least
//!    free wins (best fit). Ties go to the lowest [`HostId`](stratus_common::HostId).
//! 3. **Spread against pack.** When the fitting hosts span clusters with
//!    different weighers, the best spread host and the best pack host meet:
//!    each is scored by how well it serves its own weigher, the spread host by
//!    the fraction of its effective memory left free after placement, the
//!    pack host by the fraction used. The higher score wins, compared exactly
//!    (`free_s × eff_p` against `used_p × eff_s` in 128 bits); equal scores
//!    go to the lower [`HostId`](stratus_common::HostId). When every candidate shares one weigher,
//!    this step never arises and the order is simply step 2.
//!
//! Only memory orders hosts: ordering by one key is what lets ordered indexes
//! find the exact best host without scanning (see [`engine`]'s module doc).
//!
//! # Determinism
//!
//! The same hosts, policies and calls give the same placements: no result
//! depends on hash-map iteration order, and every tie ends on the host id.
//!
//! # Explanations
//!
//! When nothing fits, [`NoFit`] counts, per filter, the hosts that filter
//! eliminated (each host under the first filter that eliminated it, so the
//! counts add up to the hosts that did not fit) and names the closest near
//! misses: hosts that passed every filter but capacity, ranked by their
//! largest relative shortfall. [`Engine::explain`] gives the same view as a
//! dry run, including where the VM would go.

pub mod bench;
pub mod engine;
pub mod explain;
pub mod model;

pub use engine::Engine;
pub use explain::{
    BatchNoFit, Elimination, Explanation, Filter, NearMiss, NoFit, Resource, Shortfall,
};
pub use model::{
    ClusterPolicy, GroupPolicy, HostCondition, HostSnapshot, ParseError, Ratios, Request,
    Resources, Weigher,
};
