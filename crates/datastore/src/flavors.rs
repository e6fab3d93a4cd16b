//! Flavors: named VM sizes.

use stratus_common::time::now_micros;
use stratus_common::{Error, FlavorId, ResourceKind};

use crate::db::{db_error, is_unique_violation};
use crate::model::{i64_of, FlavorRecord};
use crate::page::{ListQuery, Page, PageRequest};
use crate::Datastore;

const SELECT: &str = "SELECT id, name, vcpus, memory_bytes, disk_bytes, created_at FROM flavors";

impl Datastore {
    pub async fn flavor_create(
        &self,
        name: &str,
        vcpus: u32,
        memory_bytes: u64,
        disk_bytes: u64,
    ) -> Result<FlavorRecord, Error> {
        let rec = FlavorRecord {
            id: FlavorId::new(),
            name: name.to_string(),
            vcpus,
            memory_bytes,
            disk_bytes,
            created_at: now_micros(),
        };
        sqlx::query(
            "INSERT INTO flavors (id, name, vcpus, memory_bytes, disk_bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(rec.id.to_string())
        .bind(&rec.name)
        .bind(i64::from(vcpus))
        .bind(i64_of(memory_bytes))
        .bind(i64_of(disk_bytes))
        .bind(rec.created_at)
        .execute(&self.write)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::conflict(
                    "name_in_use",
                    format!("a flavor named {name:?} already exists"),
                )
            } else {
                db_error("creating a flavor", e)
            }
        })?;
        Ok(rec)
    }

    pub async fn flavor_get(&self, id: FlavorId) -> Result<FlavorRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a flavor", e))?;
        match row {
            Some(r) => FlavorRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Flavor, id)),
        }
    }

    pub async fn flavor_get_by_name(&self, name: &str) -> Result<FlavorRecord, Error> {
        let row = sqlx::query(&format!("{SELECT} WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(|e| db_error("reading a flavor", e))?;
        match row {
            Some(r) => FlavorRecord::from_row(&r),
            None => Err(Error::not_found(ResourceKind::Flavor, name)),
        }
    }

    pub async fn flavor_list(
        &self,
        name: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<FlavorRecord>, Error> {
        let mut q = ListQuery::new();
        if let Some(n) = name {
            q.eq("name", n);
        }
        q.fetch(&self.read, SELECT, page, FlavorRecord::from_row, |f| {
            f.id.to_string()
        })
        .await
    }

    /// Deletes a flavor no VM uses. VMs copy their sizes at creation, but the
    /// reference stays for reporting, so a flavor in use is kept.
    pub async fn flavor_delete(&self, id: FlavorId) -> Result<(), Error> {
        let ctx = "deleting a flavor";
        let mut tx = self.write.begin().await.map_err(|e| db_error(ctx, e))?;
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE flavor_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if used > 0 {
            return Err(Error::conflict(
                "flavor_in_use",
                format!("{used} VM(s) use this flavor; it cannot be deleted while they exist"),
            ));
        }
        let done = sqlx::query("DELETE FROM flavors WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(ctx, e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(ResourceKind::Flavor, id));
        }
        tx.commit().await.map_err(|e| db_error(ctx, e))
    }
}
