//! Projects.

use stratus_api_types::params::{PageParams, ProjectCreate, ProjectFilter};
use stratus_api_types::views::{Project, ProjectPage};
use stratus_common::Error;
use stratus_datastore::PageRequest;

use crate::app::{lookup, Actor, App};

const MAX_DESCRIPTION: usize = 1024;

pub async fn project_create(app: &App, actor: &Actor, p: ProjectCreate) -> Result<Project, Error> {
    actor.require_admin("create projects")?;
    if p.description.len() > MAX_DESCRIPTION {
        return Err(Error::invalid(
            "description",
            format!(
                "description is {} bytes; the limit is {MAX_DESCRIPTION}",
                p.description.len()
            ),
        ));
    }
    Ok(app
        .ds
        .project_create(p.name.as_str(), &p.description)
        .await?
        .into_view())
}

pub async fn project_list(
    app: &App,
    actor: &Actor,
    f: ProjectFilter,
    page: PageParams,
) -> Result<ProjectPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let only = actor.own_project();
    if !actor.is_admin() && only.is_none() {
        return Ok(ProjectPage {
            items: vec![],
            next_cursor: None,
        });
    }
    let p = app.ds.project_list(only, f.name.as_deref(), &page).await?;
    Ok(ProjectPage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

pub async fn project_view(app: &App, actor: &Actor, key: &str) -> Result<Project, Error> {
    Ok(lookup::project(app, actor, key).await?.into_view())
}

pub async fn project_delete(app: &App, actor: &Actor, key: &str) -> Result<(), Error> {
    let p = lookup::project(app, actor, key).await?;
    actor.require_admin("delete projects")?;
    app.ds.project_delete(p.id).await?;
    app.tokens.clear();
    Ok(())
}
