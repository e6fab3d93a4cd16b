//! Why a VM can or cannot go somewhere: the filters, the per-filter counts of
//! eliminated hosts, the near misses, and the refusal errors built from them.
//! These types are serializable so the controller can return them as JSON.

use std::fmt;

use serde::{Deserialize, Serialize};
use stratus_common::bytes::{GIB, KIB, MIB, TIB};
use stratus_common::HostId;

use crate::model::word_enum;

/// The filters, in the order they are applied. A host is attributed to the
/// first filter that eliminates it, so the counts of one refusal add up to
/// the number of hosts that did not fit: the order puts the operator's facts
/// (state, location, tags) before the ones that change with every placement
/// (groups, capacity), which is the order an operator fixes things in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Not up (unreachable, in maintenance or draining).
    State,
    /// In another zone than the request names.
    Zone,
    /// In another cluster than the request names.
    Cluster,
    /// Lacks a tag the request requires.
    RequiredTags,
    /// Carries a tag the request forbids.
    ForbiddenTags,
    /// Listed in the request's excluded hosts.
    Excluded,
    /// Holds no member of a hard-affinity group that has members elsewhere.
    Affinity,
    /// Already holds a member of the hard anti-affinity group.
    AntiAffinity,
    /// Not enough effective vCPUs free.
    Vcpus,
    /// Not enough effective memory free.
    Memory,
    /// Not enough effective disk free.
    Disk,
}

word_enum!(Filter, "filter", {
    State => "state",
    Zone => "zone",
    Cluster => "cluster",
    RequiredTags => "required_tags",
    ForbiddenTags => "forbidden_tags",
    Excluded => "excluded",
    Affinity => "affinity",
    AntiAffinity => "anti_affinity",
    Vcpus => "vcpus",
    Memory => "memory",
    Disk => "disk",
});

impl Filter {
    pub(crate) const COUNT: usize = 11;

    /// Position in [`Filter::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// What the eliminated hosts "are" or "do", for one host and for several.
    fn phrase(self) -> (&'static str, &'static str) {
        match self {
            Filter::State => ("is not up", "are not up"),
            Filter::Zone => ("is in another zone", "are in another zone"),
            Filter::Cluster => ("is in another cluster", "are in another cluster"),
            Filter::RequiredTags => ("lacks a required tag", "lack a required tag"),
            Filter::ForbiddenTags => ("carries a forbidden tag", "carry a forbidden tag"),
            Filter::Excluded => ("is excluded", "are excluded"),
            Filter::Affinity => (
                "holds no member of the affinity group",
                "hold no member of the affinity group",
            ),
            Filter::AntiAffinity => (
                "already holds a member of the anti-affinity group",
                "already hold a member of the anti-affinity group",
            ),
            Filter::Vcpus => ("lacks vCPUs", "lack vCPUs"),
            Filter::Memory => ("lacks memory", "lack memory"),
            Filter::Disk => ("lacks disk", "lack disk"),
        }
    }
}

/// How many hosts one filter eliminated (each host counted once, under the
/// first filter that eliminated it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elimination {
    pub filter: Filter,
    pub hosts: usize,
}

/// A scheduled resource, as named in a [`Shortfall`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Vcpus,
    Memory,
    Disk,
}

word_enum!(Resource, "resource", { Vcpus => "vcpus", Memory => "memory", Disk => "disk" });

/// One resource a near-miss host lacks: the request needs `needed`, the host
/// has `available` free (effective capacity less allocation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    pub resource: Resource,
    pub needed: u64,
    pub available: u64,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.resource {
            Resource::Vcpus => write!(
                f,
                "needs {} vCPU{}, has {} free",
                self.needed,
                if self.needed == 1 { "" } else { "s" },
                self.available
            ),
            Resource::Memory | Resource::Disk => write!(
                f,
                "needs {} {}, has {} free",
                human_bytes(self.needed),
                self.resource,
                human_bytes(self.available)
            ),
        }
    }
}

/// A host that passed every filter but capacity: the operator's best lead
/// when nothing fits (free some room there, or raise the cluster's ratio).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NearMiss {
    pub host: HostId,
    pub name: String,
    /// Every resource it lacks, vCPUs, memory, disk in that order.
    pub lacking: Vec<Shortfall>,
}

impl fmt::Display for NearMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (", self.name)?;
        for (i, s) in self.lacking.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{s}")?;
        }
        f.write_str(")")
    }
}

/// No host can take the VM. `eliminated` lists, in filter order, every
/// filter that eliminated at least one host and how many; `near_misses` the
/// (up to three) hosts eliminated only by capacity, closest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct NoFit {
    pub hosts_total: usize,
    pub eliminated: Vec<Elimination>,
    pub near_misses: Vec<NearMiss>,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no host can take this VM: ")?;
        if self.hosts_total == 0 {
            return f.write_str("there are no hosts");
        }
        write_counts(f, self.hosts_total, &self.eliminated)?;
        if let Some(closest) = self.near_misses.first() {
            write!(f, "; closest: {closest}")?;
        }
        Ok(())
    }
}

/// A batch could not be placed whole. Nothing of it stays committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "request {index} of the batch cannot be placed; the {placed_before} placed before it were rolled back"
)]
pub struct BatchNoFit {
    /// Position of the request that did not fit.
    pub index: usize,
    /// How many requests had been placed (and were then rolled back).
    pub placed_before: usize,
    #[source]
    pub reason: NoFit,
}

/// A dry run: where the VM would go, and why not elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub chosen: Option<HostId>,
    pub chosen_name: Option<String>,
    pub hosts_total: usize,
    /// Hosts that passed every filter (the chosen one among them).
    pub feasible: usize,
    pub eliminated: Vec<Elimination>,
    pub near_misses: Vec<NearMiss>,
}

impl Explanation {
    /// The refusal this explanation amounts to, if nothing fits.
    pub fn no_fit(&self) -> Option<NoFit> {
        self.chosen.is_none().then(|| NoFit {
            hosts_total: self.hosts_total,
            eliminated: self.eliminated.clone(),
            near_misses: self.near_misses.clone(),
        })
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.chosen, &self.chosen_name) {
            (Some(_), Some(name)) => write!(f, "would place on {name}")?,
            (Some(id), None) => write!(f, "would place on {id}")?,
            (None, _) => f.write_str("no host can take this VM")?,
        }
        if self.hosts_total == 0 {
            return f.write_str(": there are no hosts");
        }
        write!(
            f,
            ": {} of {} host{} fit",
            self.feasible,
            self.hosts_total,
            if self.hosts_total == 1 { "" } else { "s" }
        )?;
        if !self.eliminated.is_empty() {
            f.write_str("; ")?;
            write_eliminations(f, &self.eliminated)?;
        }
        if self.chosen.is_none() {
            if let Some(closest) = self.near_misses.first() {
                write!(f, "; closest: {closest}")?;
            }
        }
        Ok(())
    }
}

/// "of 12 hosts, 2 are not up, 3 are in another zone".
fn write_counts(
    f: &mut fmt::Formatter<'_>,
    hosts_total: usize,
    eliminated: &[Elimination],
) -> fmt::Result {
    write!(
        f,
        "of {hosts_total} host{}, ",
        if hosts_total == 1 { "" } else { "s" }
    )?;
    if eliminated.is_empty() {
        return f.write_str("none was eliminated");
    }
    write_eliminations(f, eliminated)
}

fn write_eliminations(f: &mut fmt::Formatter<'_>, eliminated: &[Elimination]) -> fmt::Result {
    for (i, e) in eliminated.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        let (one, many) = e.filter.phrase();
        write!(f, "{} {}", e.hosts, if e.hosts == 1 { one } else { many })?;
    }
    Ok(())
}

/// Bytes with one decimal in the largest binary unit that fits ("4.0 GiB").
pub(crate) fn human_bytes(n: u64) -> String {
    for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size {
            return format!("{:.1} {unit}", n as f64 / size as f64);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_words_round_trip_in_order() {
        for (i, f) in Filter::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
            assert_eq!(f.as_str().parse::<Filter>(), Ok(*f));
            let json = serde_json::to_string(f).expect("serializes");
            assert_eq!(json, format!("\"{}\"", f.as_str()));
        }
        assert_eq!(Filter::ALL.len(), Filter::COUNT);
    }

    #[test]
    fn human_bytes_uses_one_decimal() {
        assert_eq!(human_bytes(4 * GIB), "4.0 GiB");
        assert_eq!(human_bytes(3 * GIB / 2), "1.5 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(2 * TIB), "2.0 TiB");
    }

    #[test]
    fn no_fit_message_names_counts_and_closest() {
        let no_fit = NoFit {
            hosts_total: 12,
            eliminated: vec![
                Elimination {
                    filter: Filter::State,
                    hosts: 2,
                },
                Elimination {
                    filter: Filter::Zone,
                    hosts: 3,
                },
                Elimination {
                    filter: Filter::Memory,
                    hosts: 7,
                },
            ],
            near_misses: vec![NearMiss {
                host: HostId::new(),
                name: "host-a".into(),
                lacking: vec![Shortfall {
                    resource: Resource::Memory,
                    needed: 4 * GIB,
                    available: 2 * GIB,
                }],
            }],
        };
        assert_eq!(
            no_fit.to_string(),
            "no host can take this VM: of 12 hosts, 2 are not up, 3 are in another zone, \
             7 lack memory; closest: host-a (needs 4.0 GiB memory, has 2.0 GiB free)"
        );
        let empty = NoFit {
            hosts_total: 0,
            eliminated: vec![],
            near_misses: vec![],
        };
        assert_eq!(
            empty.to_string(),
            "no host can take this VM: there are no hosts"
        );
    }
}
