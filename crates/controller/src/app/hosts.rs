//! Hosts and enrollment tokens (admins only: hosts are infrastructure, not
//! project resources).

use stratus_api_types::params::{EnrollmentTokenCreate, HostFilter, PageParams};
use stratus_api_types::views::{EnrollmentTokenCreated, Host, HostPage};
use stratus_common::time::{from_micros, now_micros};
use stratus_common::Error;
use stratus_datastore::{HostListFilter, PageRequest};

use crate::app::{lookup, secrets, Actor, App};

pub const ENROLL_MARKER: &str = "stratus-enroll_";

pub async fn host_list(
    app: &App,
    actor: &Actor,
    f: HostFilter,
    page: PageParams,
) -> Result<HostPage, Error> {
    actor.require_admin("list hosts")?;
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let filter = HostListFilter {
        name: f.name.as_deref(),
        state: f.state,
        zone: f.zone.as_deref(),
        cluster: f.cluster.as_deref(),
    };
    let p = app.ds.host_list(&filter, &page).await?;
    Ok(HostPage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

/// A host, with the orphan VMs its agent reported.
pub async fn host_view(app: &App, actor: &Actor, key: &str) -> Result<Host, Error> {
    actor.require_admin("see hosts")?;
    let host = lookup::host(app, key).await?;
    let orphans = app.ds.host_orphans(host.id).await?;
    let mut view = host.into_view();
    view.orphans = orphans.into_iter().map(|o| o.into_view()).collect();
    Ok(view)
}

pub async fn enrollment_token_create(
    app: &App,
    actor: &Actor,
    p: EnrollmentTokenCreate,
) -> Result<EnrollmentTokenCreated, Error> {
    actor.require_admin("create host enrollment tokens")?;
    let hours = p.expires_in_hours.unwrap_or(24);
    if !(1..=720).contains(&hours) {
        return Err(Error::invalid(
            "expires_in_hours",
            format!("expires_in_hours must be 1..=720, got {hours}"),
        ));
    }
    let uses = p.uses.unwrap_or(1);
    if !(1..=100_000).contains(&uses) {
        return Err(Error::invalid(
            "uses",
            format!("uses must be 1..=100000, got {uses}"),
        ));
    }
    let expires_at = now_micros() + i64::from(hours) * 3_600_000_000;
    let secret = secrets::generate(ENROLL_MARKER);
    let id = app
        .ds
        .enrollment_token_create(&secret.hash, actor.token.id, expires_at, uses)
        .await?;
    Ok(EnrollmentTokenCreated {
        id,
        token: secret.plaintext,
        expires_at: from_micros(expires_at),
        uses,
    })
}
