//! API tokens. Only their SHA-256 hashes are stored.

use stratus_common::time::now_micros;
use stratus_common::{Error, ProjectId, ResourceKind, Role, TokenId};

use crate::db::{db_error, is_fk_violation};
use crate::model::TokenRecord;
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const SELECT: &str = "SELECT id, name, role, project_id, token_hash, prefix, created_at, \
                      expires_at, revoked_at, last_used_at FROM api_tokens";

/// `last_used_at` is refreshed at most this often, so authentication does not
/// cost a write per request.
const LAST_USED_GRANULARITY_US: i64 = 60_000_000;

/// A token to store.
pub struct NewToken<'a> {
    pub name: &'a str,
    pub role: Role,
    pub project_id: Option<ProjectId>,
    pub token_hash: &'a str,
    pub prefix: &'a str,
    pub expires_at: Option<i64>,
}

impl Datastore {
    pub async fn token_create(&self, t: NewToken<'_>) -> Result<TokenRecord, Error> {
        let rec = TokenRecord {
            id: TokenId::new(),
            name: t.name.to_string(),
            role: t.role,
            project_id: t.project_id,
            token_hash: t.token_hash.to_string(),
            prefix: t.prefix.to_string(),
            created_at: now_micros(),
            expires_at: t.expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, project_id, token_hash, prefix, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(rec.id.to_string())
        .bind(&rec.name)
        .bind(rec.role.as_str())
        .bind(rec.project_id.map(|p| p.to_string()))
        .bind(&rec.token_hash)
        .bind(&rec.prefix)
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_fk_violation(&e) {
                Error::not_found(ResourceKind::Project, t.project_id.map(|p| p.to_string()).unwrap_or_default())
            } else {
                db_error("creating a token", e)
            }
        })?;
        Ok(rec)
    }

    /// The live (not revoked, not expired) token with this hash, touching its
    /// `last_used_at`.
    pub async fn token_authenticate(&self, token_hash: &str) -> Result<Option<TokenRecord>, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE token_hash = $1"))
            .bind(token_hash)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("authenticating", e))?;
        let Some(row) = row else { return Ok(None) };
        let rec = TokenRecord::from_row(&row)?;
        let now = now_micros();
        if rec.revoked_at.is_some() || rec.expires_at.is_some_and(|x| x <= now) {
            return Ok(None);
        }
        if rec
            .last_used_at
            .is_none_or(|t| now - t > LAST_USED_GRANULARITY_US)
        {
            sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(rec.id.to_string())
                .execute(&self.write)
                .await
                .map_err(|e| db_error("recording token use", e))?;
        }
        Ok(Some(rec))
    }

    pub async fn token_get(&self, id: TokenId) -> Result<TokenRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a token", e))?;
        match row {
            Some(r) => TokenRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Token, id)),
        }
    }

    pub async fn token_list(
        &self,
        project: Option<ProjectId>,
        role: Option<Role>,
        include_revoked: bool,
        page: &PageRequest,
    ) -> Result<Page<TokenRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(p) = project {
            q.eq("project_id", p.to_string());
        }
        if let Some(r) = role {
            q.eq("role", r.as_str());
        }
        if !include_revoked {
            q.cond("revoked_at IS NULL".into());
        }
        q.fetch(&self.read, SELECT, page, TokenRecord::from_row, |t| {
            t.id.to_string()
        })
        .await
    }

    /// Revokes a token. Revoking twice is not an error; the first time stands.
    pub async fn token_revoke(&self, id: TokenId) -> Result<TokenRecord, Error> {
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_micros())
            .bind(id.to_string())
            .execute(&self.write)
            .await
            .map_err(|e| db_error("revoking a token", e))?;
        self.token_get(id).await
    }

    /// Whether any live admin token exists (used at first start).
    pub async fn token_admin_exists(&self) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&self.read)
        .await
        .map_err(|e| db_error("counting admin tokens", e))?;
        Ok(n > 0)
    }
}
