//! Scheduling policy: clusters (overcommit ratios and weigher), server
//! groups, and host tags. Clusters and tags are the operator's (admin);
//! server groups belong to projects.

use stratus_api_types::params::{
    ClusterUpdate, HostUpdate, PageParams, ServerGroupCreate, ServerGroupFilter,
};
use stratus_api_types::views::{Cluster, ClusterPage, Host, ServerGroup, ServerGroupPage};
use stratus_common::Error;
use stratus_datastore::{ClusterChange, PageRequest};

use crate::app::{lookup, Actor, App};

/// Ratios are kept in thousandths; these bounds keep them meaningful.
const RATIO_RANGE: std::ops::RangeInclusive<f64> = 0.1..=64.0;

fn ratio_milli(field: &str, v: Option<f64>) -> Result<Option<u32>, Error> {
    match v {
        None => Ok(None),
        Some(r) if r.is_finite() && RATIO_RANGE.contains(&r) => {
            // In range, so the product fits a u32 comfortably.
            Ok(Some((r * 1000.0).round() as u32))
        }
        Some(r) => Err(Error::invalid(
            field,
            format!("{field} must be between 0.1 and 64, got {r}"),
        )),
    }
}

pub async fn cluster_list(app: &App, actor: &Actor) -> Result<ClusterPage, Error> {
    actor.require_admin("see clusters")?;
    let items = app
        .ds
        .cluster_list()
        .await?
        .into_iter()
        .map(|c| c.into_view())
        .collect();
    Ok(ClusterPage {
        items,
        next_cursor: None,
    })
}

pub async fn cluster_view(app: &App, actor: &Actor, name: &str) -> Result<Cluster, Error> {
    actor.require_admin("see clusters")?;
    Ok(app.ds.cluster_get(name).await?.into_view())
}

pub async fn cluster_update(
    app: &App,
    actor: &Actor,
    name: &str,
    p: ClusterUpdate,
) -> Result<Cluster, Error> {
    actor.require_admin("change clusters")?;
    let change = ClusterChange {
        cpu_ratio_milli: ratio_milli("cpu_ratio", p.cpu_ratio)?,
        ram_ratio_milli: ratio_milli("ram_ratio", p.ram_ratio)?,
        disk_ratio_milli: ratio_milli("disk_ratio", p.disk_ratio)?,
        weigher: p.weigher,
    };
    let c = app.ds.cluster_update(name, &change).await?;
    app.scheduler.cluster_changed(&c);
    Ok(c.into_view())
}

pub async fn host_update(
    app: &App,
    actor: &Actor,
    key: &str,
    p: HostUpdate,
) -> Result<Host, Error> {
    actor.require_admin("change hosts")?;
    let host = lookup::host(app, key).await?;
    let mut tags: std::collections::BTreeSet<String> = host.tags.iter().cloned().collect();
    for t in &p.add_tags {
        tags.insert(t.as_str().to_string());
    }
    for t in &p.remove_tags {
        tags.remove(t.as_str());
    }
    if tags.len() > super::MAX_TAGS {
        return Err(Error::invalid(
            "add_tags",
            format!("a host has at most {} tags", super::MAX_TAGS),
        ));
    }
    let tags: Vec<String> = tags.into_iter().collect();
    let host = app.ds.host_set_tags(host.id, &tags).await?;
    app.scheduler.host_changed(&host);
    Ok(host.into_view())
}

pub async fn server_group_create(
    app: &App,
    actor: &Actor,
    p: ServerGroupCreate,
) -> Result<ServerGroup, Error> {
    actor.require_mutate()?;
    let project = lookup::project_for_create(app, actor, p.project.as_deref()).await?;
    Ok(app
        .ds
        .server_group_create(project, p.name.as_str(), p.policy)
        .await?
        .into_view())
}

pub async fn server_group_list(
    app: &App,
    actor: &Actor,
    f: ServerGroupFilter,
    page: PageParams,
) -> Result<ServerGroupPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, f.project.as_deref()).await?;
    let p = app.ds.server_group_list(project, &page).await?;
    Ok(ServerGroupPage {
        items: p.items.into_iter().map(|g| g.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn server_group_view(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<ServerGroup, Error> {
    let project = match scope {
        Some(s) => Some(lookup::project(app, actor, s).await?.id),
        None => None,
    };
    Ok(lookup::server_group(app, actor, key, project)
        .await?
        .into_view())
}

pub async fn server_group_delete(
    app: &App,
    actor: &Actor,
    key: &str,
    scope: Option<&str>,
) -> Result<(), Error> {
    let project = match scope {
        Some(s) => Some(lookup::project(app, actor, s).await?.id),
        None => None,
    };
    let g = lookup::server_group(app, actor, key, project).await?;
    actor.require_mutate()?;
    app.ds.server_group_delete(g.id).await
}
