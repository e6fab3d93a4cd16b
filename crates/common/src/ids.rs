//! Typed ids. Each resource has its own id type so a `VmId` can never be passed
//! where a `HostId` is expected. Ids are UUIDv7: time-ordered, so ordering by id
//! is ordering by creation, which keeps cursor pagination on the primary key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The resource kind this id names, as used in messages.
            pub const KIND: &'static str = $kind;

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl<'s> utoipa::ToSchema<'s> for $name {
            fn schema() -> (&'s str, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) {
                (
                    stringify!($name),
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::SchemaType::String)
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::Uuid,
                        )))
                        .description(Some(concat!("Id of a ", $kind, ".")))
                        .into(),
                )
            }
        }
    };
}

typed_id!(
    /// Id of a project, the unit of tenancy.
    ProjectId, "project");
typed_id!(
    /// Id of an API token.
    TokenId, "token");
typed_id!(
    /// Id of a hypervisor host.
    HostId, "host");
typed_id!(
    /// Id of a host enrollment token.
    EnrollmentTokenId, "enrollment token");
typed_id!(
    /// Id of an image.
    ImageId, "image");
typed_id!(
    /// Id of a flavor.
    FlavorId, "flavor");
typed_id!(
    /// Id of a virtual machine.
    VmId, "vm");
typed_id!(
    /// Id of a job.
    JobId, "job");
typed_id!(
    /// Id of a server group (VMs placed together or apart).
    ServerGroupId, "server group");
typed_id!(
    /// Id of a backup target (a directory backups are written to).
    BackupTargetId, "backup target");
typed_id!(
    /// Id of a backup (one restore point of a VM's disk).
    BackupId, "backup");
typed_id!(
    /// Id of a disk snapshot of a VM.
    SnapshotId, "snapshot");
typed_id!(
    /// Id of a data volume.
    VolumeId, "volume");
typed_id!(
    /// Id of a shared storage pool (a directory several hosts mount).
    StoragePoolId, "storage pool");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_order_by_creation() {
        let a = VmId::new();
        let b = VmId::new();
        assert!(a < b, "UUIDv7 ids must sort by creation time");
        let parsed: VmId = a.to_string().parse().expect("own id parses");
        assert_eq!(parsed, a);
        assert!("not-a-uuid".parse::<VmId>().is_err());
    }
}
