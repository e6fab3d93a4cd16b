//! Flavors.

use stratus_api_types::params::{FlavorCreate, FlavorFilter, PageParams};
use stratus_api_types::views::{Flavor, FlavorPage};
use stratus_common::bytes::{GIB, MIB, TIB};
use stratus_common::Error;
use stratus_datastore::PageRequest;

use crate::app::{lookup, Actor, App};

pub async fn flavor_create(app: &App, actor: &Actor, p: FlavorCreate) -> Result<Flavor, Error> {
    actor.require_admin("create flavors")?;
    if !(1..=256).contains(&p.vcpus) {
        return Err(Error::invalid(
            "vcpus",
            format!("vcpus must be 1..=256, got {}", p.vcpus),
        ));
    }
    if p.memory_bytes < 64 * MIB || !p.memory_bytes.is_multiple_of(MIB) || p.memory_bytes > 16 * TIB
    {
        return Err(Error::invalid(
            "memory_bytes",
            format!(
                "memory must be a whole number of MiB between 64 MiB and 16 TiB, got {} bytes",
                p.memory_bytes
            ),
        ));
    }
    if p.disk_bytes < MIB || !p.disk_bytes.is_multiple_of(MIB) || p.disk_bytes > 64 * 1024 * GIB {
        return Err(Error::invalid(
            "disk_bytes",
            format!(
                "disk must be a whole number of MiB between 1 MiB and 64 TiB, got {} bytes",
                p.disk_bytes
            ),
        ));
    }
    Ok(app
        .ds
        .flavor_create(p.name.as_str(), p.vcpus, p.memory_bytes, p.disk_bytes)
        .await?
        .into_view())
}

pub async fn flavor_list(
    app: &App,
    _actor: &Actor,
    f: FlavorFilter,
    page: PageParams,
) -> Result<FlavorPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let p = app.ds.flavor_list(f.name.as_deref(), &page).await?;
    Ok(FlavorPage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn flavor_view(app: &App, _actor: &Actor, key: &str) -> Result<Flavor, Error> {
    Ok(lookup::flavor(app, key).await?.into_view())
}

pub async fn flavor_delete(app: &App, actor: &Actor, key: &str) -> Result<(), Error> {
    let f = lookup::flavor(app, key).await?;
    actor.require_admin("delete flavors")?;
    app.ds.flavor_delete(f.id).await
}
