//! `POST /v1/vms/{vm}/migrate` and `POST /v1/hosts/{host}/maintenance`:
//! moving VMs between hosts (administrators).

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use stratus_api_types::params::{HostMaintenanceSet, ProjectScope, VmMigrate};
use stratus_api_types::views::{HostMaintenance, VmOperation};

use super::AppState;
use crate::app::{migrate, Actor};
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiQuery};

/// Move a VM to another host (administrators): live while it runs (it
/// keeps running; memory, and the disk unless it is in a shared pool both
/// hosts see, are copied while it does), cold when it is stopped. The
/// destination is the named host, still checked by the scheduler, or the
/// scheduler's choice. The job reports bytes sent, remaining, dirty rate
/// and expected downtime; cancelling it leaves the VM where it was.
#[utoipa::path(post, path = "/v1/vms/{vm}/migrate", tag = "vms", operation_id = "vm_migrate",
    params(("vm" = String, Path, description = "VM name or id"), ProjectScope),
    request_body = VmMigrate,
    responses((status = 202, body = VmOperation, description = "accepted"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn vm_migrate(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiQuery(scope): ApiQuery<ProjectScope>,
    ApiJson(p): ApiJson<VmMigrate>,
) -> Result<(StatusCode, Json<VmOperation>), ApiError> {
    let op = migrate::vm_migrate(&s.0, &actor, &key, scope.project.as_deref(), p).await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

/// Turn a host's maintenance mode on (no new VMs; each of its VMs is
/// migrated away by its own job, targets chosen by the scheduler; those
/// that cannot move are listed with the reason) or off (administrators).
#[utoipa::path(post, path = "/v1/hosts/{host}/maintenance", tag = "hosts", operation_id = "host_maintenance",
    params(("host" = String, Path, description = "host name or id")),
    request_body = HostMaintenanceSet,
    responses((status = 200, body = HostMaintenance, description = "the host, and its VMs' moves"),
              (status = "4XX", body = ErrorBody, description = "client error"),
              (status = "5XX", body = ErrorBody, description = "server error")),
    security(("bearer" = [])))]
pub async fn host_maintenance(
    s: AppState,
    actor: Actor,
    Path(key): Path<String>,
    ApiJson(p): ApiJson<HostMaintenanceSet>,
) -> Result<Json<HostMaintenance>, ApiError> {
    Ok(Json(
        migrate::host_maintenance(&s.0, &actor, &key, p.enabled).await?,
    ))
}
