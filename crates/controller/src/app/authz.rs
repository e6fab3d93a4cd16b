//! Who is calling, and what they may do.
//!
//! | role   | sees                          | changes                          |
//! |--------|-------------------------------|----------------------------------|
//! | admin  | everything                    | everything                       |
//! | member | own project, public images, flavors | own project's resources    |
//! | reader | own project, public images, flavors | nothing                    |
//!
//! Hosts, enrollment tokens, projects and flavors are changed only by
//! admins. A resource of another project is reported as not found, never as
//! forbidden, so ids cannot be probed.

use stratus_common::{Error, ProjectId, Role};
use stratus_datastore::model::TokenRecord;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Actor {
    pub token: TokenRecord,
}

impl Actor {
    pub fn role(&self) -> Role {
        self.token.role
    }

    pub fn is_admin(&self) -> bool {
        self.token.role == Role::Admin
    }

    /// The project a non-admin is confined to; `None` for admins.
    pub fn own_project(&self) -> Option<ProjectId> {
        if self.is_admin() {
            None
        } else {
            self.token.project_id
        }
    }

    /// Whether the caller may see resources of `project`.
    pub fn can_see(&self, project: ProjectId) -> bool {
        self.is_admin() || self.token.project_id == Some(project)
    }

    pub fn require_admin(&self, what: &str) -> Result<(), Error> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::forbidden(format!("only admin tokens may {what}")))
        }
    }

    pub fn require_mutate(&self) -> Result<(), Error> {
        if self.token.role.can_mutate() {
            Ok(())
        } else {
            Err(Error::forbidden("reader tokens cannot change anything"))
        }
    }
}

/// How long an authenticated token is trusted without asking the store.
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Tokens this controller authenticated in the last [`TOKEN_CACHE_TTL`],
/// by hash: at thousands of requests a second, one store read per request
/// just to authenticate would cost more than the request. Revoking a token
/// (or deleting its project) through this controller clears the cache at
/// once; through another controller it takes effect here within the TTL.
/// Expiry is checked on every use.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: std::sync::Mutex<
        std::collections::HashMap<
            String,
            (stratus_datastore::model::TokenRecord, std::time::Instant),
        >,
    >,
}

/// Beyond this many cached tokens the cache starts over (it is a cache of
/// the tokens in active use, not of every token).
const TOKEN_CACHE_MAX: usize = 10_000;

impl TokenCache {
    pub fn get(&self, hash: &str) -> Option<stratus_datastore::model::TokenRecord> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (rec, at) = entries.get(hash)?;
        let now = stratus_common::time::now_micros();
        if at.elapsed() > TOKEN_CACHE_TTL || rec.expires_at.is_some_and(|x| x <= now) {
            return None;
        }
        Some(rec.clone())
    }

    pub fn put(&self, hash: &str, rec: &stratus_datastore::model::TokenRecord) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash.to_string(), (rec.clone(), std::time::Instant::now()));
    }

    /// Forgets every token (after a revocation or a project deletion).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
