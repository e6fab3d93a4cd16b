//! The engine's vocabulary: resources, overcommit ratios, weighers, host
//! snapshots, server-group policies and placement requests. Plain data, no
//! behaviour beyond arithmetic and parsing.

use std::ops::{Add, AddAssign, Sub, SubAssign};

use serde::{Deserialize, Serialize};
use stratus_common::{HostId, ServerGroupId};

/// An amount of the three scheduled resources. Used for a host's physical
/// capacity, its allocation, its effective (overcommitted) capacity and a
/// VM's request.
///
/// The arithmetic operators saturate instead of overflowing: an allocation
/// is a sum of requests the caller chose, and a wrapped counter would make a
/// full host look empty, which is worse than a pinned one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl Resources {
    pub const ZERO: Resources = Resources {
        vcpus: 0,
        memory_bytes: 0,
        disk_bytes: 0,
    };

    pub const fn new(vcpus: u64, memory_bytes: u64, disk_bytes: u64) -> Self {
        Self {
            vcpus,
            memory_bytes,
            disk_bytes,
        }
    }

    /// Component-wise sum, pinned at `u64::MAX`.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_add(other.disk_bytes),
        }
    }

    /// Component-wise difference, pinned at zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_sub(other.disk_bytes),
        }
    }

    /// Component-wise sum, or `None` if any component overflows.
    pub fn checked_add(self, other: Resources) -> Option<Resources> {
        Some(Resources {
            vcpus: self.vcpus.checked_add(other.vcpus)?,
            memory_bytes: self.memory_bytes.checked_add(other.memory_bytes)?,
            disk_bytes: self.disk_bytes.checked_add(other.disk_bytes)?,
        })
    }

    /// True if every component is at most `limit`'s.
    pub fn fits_within(self, limit: Resources) -> bool {
        self.vcpus <= limit.vcpus
            && self.memory_bytes <= limit.memory_bytes
            && self.disk_bytes <= limit.disk_bytes
    }
}

impl Add for Resources {
    type Output = Resources;
    /// Saturating; see the type's doc.
    fn add(self, rhs: Resources) -> Resources {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Resources {
    fn add_assign(&mut self, rhs: Resources) {
        *self = self.saturating_add(rhs);
    }
}

impl Sub for Resources {
    type Output = Resources;
    /// Saturating; see the type's doc.
    fn sub(self, rhs: Resources) -> Resources {
        self.saturating_sub(rhs)
    }
}

impl SubAssign for Resources {
    fn sub_assign(&mut self, rhs: Resources) {
        *self = self.saturating_sub(rhs);
    }
}

/// Overcommit ratios in thousandths (4000 = 4.0), the unit the datastore keeps
/// them in: integers make "fits" exact and identical in SQL and here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ratios {
    pub cpu_milli: u32,
    pub ram_milli: u32,
    pub disk_milli: u32,
}

impl Ratios {
    /// CPU 4.0 (guests idle most of the time), memory and disk 1.0 (neither
    /// can be taken back from a guest without its cooperation).
    pub const DEFAULT: Ratios = Ratios {
        cpu_milli: 4000,
        ram_milli: 1000,
        disk_milli: 1000,
    };

    /// The capacity the scheduler may hand out on a host with `physical`
    /// resources: `physical × ratio / 1000`, computed in 128 bits, rounded
    /// down (never promise a fraction of a byte or a vCPU that is not there)
    /// and pinned at `u64::MAX`.
    pub fn effective(&self, physical: Resources) -> Resources {
        fn scale(value: u64, milli: u32) -> u64 {
            let scaled = u128::from(value) * u128::from(milli) / 1000;
            u64::try_from(scaled).unwrap_or(u64::MAX)
        }
        Resources {
            vcpus: scale(physical.vcpus, self.cpu_milli),
            memory_bytes: scale(physical.memory_bytes, self.ram_milli),
            disk_bytes: scale(physical.disk_bytes, self.disk_milli),
        }
    }
}

impl Default for Ratios {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a policy word was refused by one of this crate's `FromStr`s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (expected one of: {})", .expected.join(", "))]
pub struct ParseError {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

macro_rules! word_enum {
    ($ty:ident, $kind:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The word used in the API, the datastore and messages.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($ty::$variant => $word),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::model::ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($ty::$variant),)+
                    _ => Err($crate::model::ParseError {
                        kind: $kind,
                        value: s.to_string(),
                        expected: &[$($word),+],
                    }),
                }
            }
        }
    };
}
pub(crate) use word_enum;

/// How a cluster orders the hosts that can take a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weigher {
    /// Least allocated first: the most free effective memory after placement.
    /// Keeps noisy neighbours apart and leaves room on every host.
    #[default]
    Spread,
    /// Best fit: the least free effective memory that still fits. Fills hosts
    /// one at a time so whole hosts stay free for large VMs or power-down.
    Pack,
}

word_enum!(Weigher, "weigher", { Spread => "spread", Pack => "pack" });

/// Per-cluster scheduling settings. Clusters without one use the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub ratios: Ratios,
    pub weigher: Weigher,
}

/// What the control plane knows of a host's health and the operator's intent
/// for it. Only [`HostCondition::Up`] takes new VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostCondition {
    Up,
    /// The agent stopped reporting: its VMs may still run, but nothing new
    /// should land where nobody can start it.
    Unreachable,
    /// The operator took it out for work.
    Maintenance,
    /// Being emptied: its VMs are leaving, new ones must not arrive.
    Draining,
}

word_enum!(HostCondition, "host condition", {
    Up => "up",
    Unreachable => "unreachable",
    Maintenance => "maintenance",
    Draining => "draining",
});

impl HostCondition {
    pub fn is_schedulable(&self) -> bool {
        matches!(self, HostCondition::Up)
    }
}

/// Everything the engine needs to know about one host. The controller builds
/// it from the datastore; [`crate::Engine::host`] gives it back with the
/// allocation as the engine currently counts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    pub id: HostId,
    pub name: String,
    pub zone: String,
    pub cluster: String,
    pub condition: HostCondition,
    pub tags: Vec<String>,
    /// Physical capacity, before the cluster's overcommit ratios.
    pub capacity: Resources,
    /// The sum of the VMs placed (or claimed) on the host.
    pub allocated: Resources,
}

/// How the members of a server group are placed relative to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    /// All members on hosts that already hold members (the first goes
    /// anywhere). Refuses rather than splits.
    Affinity,
    /// Never two members on one host. Refuses rather than doubles up.
    AntiAffinity,
    /// Prefer the host with the most members; never refuses for it.
    SoftAffinity,
    /// Prefer the host with the fewest members; never refuses for it.
    SoftAntiAffinity,
}

word_enum!(GroupPolicy, "server group policy", {
    Affinity => "affinity",
    AntiAffinity => "anti-affinity",
    SoftAffinity => "soft-affinity",
    SoftAntiAffinity => "soft-anti-affinity",
});

impl GroupPolicy {
    /// Hard policies eliminate hosts; soft ones only order them.
    pub fn is_hard(&self) -> bool {
        matches!(self, GroupPolicy::Affinity | GroupPolicy::AntiAffinity)
    }
}

/// One VM to place and the constraints on where it may go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub resources: Resources,
    /// Only hosts in this zone.
    pub zone: Option<String>,
    /// Only hosts in this cluster.
    pub cluster: Option<String>,
    /// The host must carry every one of these tags.
    pub require_tags: Vec<String>,
    /// The host must carry none of these tags.
    pub forbid_tags: Vec<String>,
    /// The server group the VM joins, and the group's policy.
    pub group: Option<(ServerGroupId, GroupPolicy)>,
    /// Hosts that must not be chosen, e.g. a migration's source.
    pub exclude_hosts: Vec<HostId>,
}

impl Request {
    /// A request for `resources` with no constraint.
    pub fn new(resources: Resources) -> Self {
        Self {
            resources,
            ..Self::default()
        }
    }
}
