//! API tokens.

use stratus_api_types::params::{PageParams, TokenCreate, TokenFilter};
use stratus_api_types::views::{Token, TokenCreated, TokenPage, WhoAmI};
use stratus_common::time::now_micros;
use stratus_common::{Error, ResourceKind, Role, TokenId};
use stratus_datastore::{NewToken, PageRequest};

use crate::app::{lookup, secrets, Actor, App};

/// The marker every API token starts with.
pub const TOKEN_MARKER: &str = "stratus_";
const MAX_EXPIRY_DAYS: u32 = 3650;

pub async fn token_create(app: &App, actor: &Actor, p: TokenCreate) -> Result<TokenCreated, Error> {
    actor.require_mutate()?;
    let project_id = match (p.role, p.project.as_deref()) {
        (Role::Admin, None) => {
            actor.require_admin("create admin tokens")?;
            None
        }
        (Role::Admin, Some(_)) => {
            return Err(Error::invalid(
                "project",
                "admin tokens span projects; leave `project` out",
            ));
        }
        (_, given) => Some(lookup::project_for_create(app, actor, given).await?),
    };
    let expires_at = match p.expires_in_days {
        None => None,
        Some(d) if (1..=MAX_EXPIRY_DAYS).contains(&d) => {
            Some(now_micros() + i64::from(d) * 86_400_000_000)
        }
        Some(d) => {
            return Err(Error::invalid(
                "expires_in_days",
                format!("expires_in_days must be 1..={MAX_EXPIRY_DAYS}, got {d}"),
            ))
        }
    };
    let secret = secrets::generate(TOKEN_MARKER);
    let rec = app
        .ds
        .token_create(NewToken {
            name: p.name.as_str(),
            role: p.role,
            project_id,
            token_hash: &secret.hash,
            prefix: &secret.prefix,
            expires_at,
        })
        .await?;
    Ok(TokenCreated {
        token: rec.into_view(),
        secret: secret.plaintext,
    })
}

pub async fn token_list(
    app: &App,
    actor: &Actor,
    f: TokenFilter,
    page: PageParams,
) -> Result<TokenPage, Error> {
    let page = PageRequest::parse(page.limit, page.cursor.as_deref())?;
    let project = lookup::project_filter(app, actor, f.project.as_deref()).await?;
    let p = app
        .ds
        .token_list(project, f.role, f.include_revoked.unwrap_or(false), &page)
        .await?;
    Ok(TokenPage {
        items: p.items.into_iter().map(|r| r.into_view()).collect(),
        next_cursor: p.next_cursor,
    })
}

async fn visible_token(
    app: &App,
    actor: &Actor,
    key: &str,
) -> Result<stratus_datastore::model::TokenRecord, Error> {
    let id: TokenId = key
        .parse()
        .map_err(|_| Error::invalid("token", format!("{key:?} is not a token id")))?;
    let rec = app.ds.token_get(id).await.map_err(|e| match e {
        Error::NotFound { .. } => Error::not_found(ResourceKind::Token, key),
        other => other,
    })?;
    let visible = match rec.project_id {
        Some(p) => actor.can_see(p),
        None => actor.is_admin(),
    };
    if visible {
        Ok(rec)
    } else {
        Err(Error::not_found(ResourceKind::Token, key))
    }
}

pub async fn token_view(app: &App, actor: &Actor, key: &str) -> Result<Token, Error> {
    Ok(visible_token(app, actor, key).await?.into_view())
}

pub async fn token_revoke(app: &App, actor: &Actor, key: &str) -> Result<Token, Error> {
    let rec = visible_token(app, actor, key).await?;
    actor.require_mutate()?;
    let revoked = app.ds.token_revoke(rec.id).await?;
    app.tokens.clear();
    Ok(revoked.into_view())
}

pub async fn whoami(app: &App, actor: &Actor) -> Result<WhoAmI, Error> {
    let project = match actor.token.project_id {
        Some(p) => Some(app.ds.project_get(p).await?.into_view()),
        None => None,
    };
    Ok(WhoAmI {
        token: actor.token.clone().into_view(),
        project,
    })
}

/// Creates the first admin token if no live admin token exists: how a new
/// installation gets its first credential. Returns the secret when one was
/// made.
pub async fn bootstrap_admin(app: &App) -> Result<Option<String>, Error> {
    if app.ds.token_admin_exists().await? {
        return Ok(None);
    }
    let secret = secrets::generate(TOKEN_MARKER);
    app.ds
        .token_create(NewToken {
            name: "bootstrap-admin",
            role: Role::Admin,
            project_id: None,
            token_hash: &secret.hash,
            prefix: &secret.prefix,
            expires_at: None,
        })
        .await?;
    Ok(Some(secret.plaintext))
}
