//! The OpenAPI 3 document, generated from the handlers' annotations.
//!
//! The document is checked in at `openapi/stratus.json`; the CLI's client
//! is generated from that file. `tests/openapi.rs` fails when the two
//! differ (set `STRATUS_BLESS=1` to rewrite the file after an intended API
//! change).

use stratus_api_types::{agent as proto, params, views};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::handlers::*;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Stratus", description = "The Stratus private-cloud control plane API.", version = "1.0.0"),
    paths(
        system::healthz, system::openapi_document,
        projects::project_create, projects::project_list, projects::project_view, projects::project_delete,
        tokens::token_create, tokens::token_list, tokens::token_view, tokens::token_revoke, tokens::whoami,
        hosts::host_list, hosts::host_view, hosts::enrollment_token_create,
        scheduling::host_update, scheduling::cluster_list, scheduling::cluster_view, scheduling::cluster_update,
        scheduling::server_group_create, scheduling::server_group_list, scheduling::server_group_view,
        scheduling::server_group_delete,
        flavors::flavor_create, flavors::flavor_list, flavors::flavor_view, flavors::flavor_delete,
        images::image_create, images::image_upload, images::image_list, images::image_view, images::image_delete,
        vms::vm_create, vms::vm_list, vms::vm_view, vms::vm_update, vms::vm_delete, vms::vm_start, vms::vm_stop, vms::vm_reboot,
        vms::vm_console, vms::vm_exec, vms::vm_batch_create, vms::vm_placement_preview,
        agent::agent_enroll, agent::agent_report, agent::agent_desired, agent::agent_request_result,
        agent::agent_console_append, agent::agent_image_download, agent::agent_request_progress,
        pools::pool_create, pools::pool_list, pools::pool_view, pools::pool_delete,
        migrate::vm_migrate, migrate::host_maintenance,
        backups::backup_target_create, backups::backup_target_list, backups::backup_target_delete,
        backups::backup_create, backups::backup_list, backups::backup_view, backups::backup_verify,
        backups::backup_restore, backups::backup_delete, backups::backup_policy_set,
        backups::backup_policy_view, backups::backup_policy_delete, backups::backup_policy_list,
        snapshots::snapshot_create, snapshots::snapshot_list, snapshots::snapshot_delete,
        snapshots::snapshot_revert, snapshots::snapshot_policy_set, snapshots::snapshot_policy_view,
        snapshots::snapshot_policy_delete, snapshots::snapshot_policy_run,
        snapshots::snapshot_policy_list,
        volumes::volume_create, volumes::volume_list, volumes::volume_view, volumes::volume_delete,
        volumes::volume_attach, volumes::volume_detach, volumes::volume_resize,
        jobs::job_list, jobs::job_view, jobs::job_wait, jobs::job_cancel,
    ),
    components(schemas(
        stratus_common::ProjectId, stratus_common::TokenId, stratus_common::HostId,
        stratus_common::EnrollmentTokenId, stratus_common::ImageId, stratus_common::FlavorId,
        stratus_common::VmId, stratus_common::JobId, stratus_common::Name, stratus_common::Role,
        stratus_common::ServerGroupId, stratus_common::BackupTargetId, stratus_common::BackupId,
        stratus_common::StoragePoolId, params::StoragePoolCreate, views::StoragePool, views::PoolHost,
        proto::PoolAssignment, proto::PoolReport, proto::MigrationRole,
        params::VmMigrate, params::HostMaintenanceSet, views::HostMaintenance, views::Evacuation,
        params::BackupTargetCreate, params::BackupCreate, params::BackupRestore,
        views::BackupTarget, views::BackupMode, views::BackupStatus, views::Backup, views::BackupPage,
        views::BackupVerification, views::BackupOperation,
        proto::BackupParentRef, proto::BackupDone, proto::BackupChecked, proto::RequestProgress,
        proto::BackupChildRef, proto::BackupPruned, proto::SnapshotTaken, stratus_common::SnapshotId,
        views::BackupVolume, proto::VolumeFileRef, proto::VolumeBackupDelete, proto::VolumePruned,
        proto::VolumeBackupDone, proto::VolumeChecked, proto::RestoreVolume,
        proto::VolumeOnHost, stratus_common::VolumeId, views::VolumeStatus, views::Volume,
        views::VolumePage, views::VolumeOperation, params::VolumeCreate, params::VolumeAttach,
        params::VolumeResize,
        views::SnapshotStatus, views::Snapshot, views::SnapshotOperation, params::SnapshotCreate, views::SnapshotPolicy, params::SnapshotPolicySet, views::BackupPolicy, params::BackupPolicySet,
        params::VmBatchCreate, params::ClusterUpdate, params::ServerGroupCreate, params::HostUpdate,
        views::Allocation, views::Weigher, views::Cluster, views::ClusterPage, views::GroupPolicy,
        views::ServerGroup, views::ServerGroupPage, views::VmPlacement, views::FilterCount, views::Shortfall,
        views::NearMiss, views::PlacementExplanation, views::PlannedVm, views::PlacementPreview, views::VmBatch,
        params::ProjectCreate, params::TokenCreate, params::EnrollmentTokenCreate, params::ImageCreate,
        params::FlavorCreate, params::VmCreate, params::VmUpdate,
        views::ErrorBody, views::Health, views::Project, views::ProjectPage, views::Token, views::TokenPage,
        views::TokenCreated, views::WhoAmI, views::HostState, views::Host, views::HostOrphan, views::HostPage,
        views::EnrollmentTokenCreated, views::ImageFormat, views::ImageVisibility, views::ImageState,
        views::Image, views::ImagePage, views::Flavor, views::FlavorPage, views::VmDesiredState, views::RestartPolicy,
        views::VmState, views::Vm, views::VmPage, views::VmOperation, views::JobState, views::JobError,
        views::JobEvent, views::Job, views::JobPage, views::VmConsole, params::VmExec,
        proto::HostFacts, proto::AgentEnroll, proto::AgentEnrolled, proto::ObservedVmState, proto::GuestAgentInfo,
        proto::VmObservation, proto::OrphanAction, proto::OrphanReport, proto::AgentReport, proto::AgentReportAck, proto::ImagePart, proto::DesiredImage,
        proto::DesiredVm, proto::AgentRequestKind, proto::AgentRequest, proto::AgentDesired, proto::ExecResult,
        proto::AgentRequestResult, proto::ConsoleAppend,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "system"), (name = "projects"), (name = "tokens"), (name = "hosts"),
        (name = "flavors"), (name = "images"), (name = "vms"), (name = "jobs"), (name = "agent"),
        (name = "scheduling"), (name = "backups"), (name = "snapshots"), (name = "volumes"), (name = "storage"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline, exactly as checked in.
pub fn document_string() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

pub fn document_json() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}
