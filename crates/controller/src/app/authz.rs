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
