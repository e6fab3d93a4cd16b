//! Cursor pagination and dynamic filters.
//!
//! Lists are ordered by id (UUIDv7, so by creation). The cursor is the last
//! id of the previous page, wrapped so clients treat it as opaque; the next
//! query is `WHERE id > $cursor ORDER BY id LIMIT n + 1` (the extra row tells
//! whether there is a next page). It uses the primary key index whatever the
//! table's size.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use stratus_common::Error;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// A validated page request.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub limit: u32,
    pub after: Option<String>,
}

impl PageRequest {
    /// Validates the API's `limit` and `cursor`.
    pub fn parse(limit: Option<u32>, cursor: Option<&str>) -> Result<Self, Error> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_LIMIT}, got {limit}"),
            ));
        }
        let after = match cursor {
            None | Some("") => None,
            Some(c) => Some(decode_cursor(c)?),
        };
        Ok(PageRequest { limit, after })
    }

    pub fn first(limit: u32) -> Self {
        PageRequest { limit, after: None }
    }
}

fn decode_cursor(c: &str) -> Result<String, Error> {
    let bad = || Error::invalid("cursor", "cursor is not one this server issued");
    let bytes = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    let id = s.strip_prefix("v1:").ok_or_else(bad)?;
    uuid::Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(id.to_string())
}

pub(crate) fn encode_cursor(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{id}"))
}

/// A page of results.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// A bound value for a dynamically built query.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// Builds `SELECT cols FROM table WHERE conds AND id > cursor ORDER BY id
/// LIMIT n+1` with numbered placeholders.
pub(crate) struct ListQuery {
    conds: Vec<String>,
    args: Vec<Arg>,
}

impl ListQuery {
    pub fn new() -> Self {
        ListQuery {
            conds: Vec::new(),
            args: Vec::new(),
        }
    }

    /// The next placeholder, bound to `arg`.
    pub fn bind(&mut self, arg: Arg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    /// Adds `column = value`.
    pub fn eq(&mut self, column: &str, value: impl Into<String>) -> &mut Self {
        let p = self.bind(Arg::Text(value.into()));
        self.conds.push(format!("{column} = {p}"));
        self
    }

    /// Adds a raw condition (placeholders from [`Self::bind`]).
    pub fn cond(&mut self, cond: String) -> &mut Self {
        self.conds.push(cond);
        self
    }

    pub async fn fetch<T>(
        mut self,
        pool: &sqlx::AnyPool,
        select: &str,
        page: &PageRequest,
        from_row: impl Fn(&sqlx::any::AnyRow) -> Result<T, Error>,
        id_of: impl Fn(&T) -> String,
    ) -> Result<Page<T>, Error> {
        if let Some(after) = &page.after {
            let p = self.bind(Arg::Text(after.clone()));
            self.conds.push(format!("id > {p}"));
        }
        let limit = self.bind(Arg::Int(i64::from(page.limit) + 1));
        let mut sql = select.to_string();
        if !self.conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&self.conds.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
        let mut q = sqlx::query(&sql);
        for a in self.args {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        let rows = q
            .fetch_all(pool)
            .await
            .map_err(|e| crate::db::db_error("listing", e))?;
        let mut items = rows
            .iter()
            .map(from_row)
            .collect::<Result<Vec<T>, Error>>()?;
        let next_cursor = if items.len() > page.limit as usize {
            items.truncate(page.limit as usize);
            items.last().map(|last| encode_cursor(&id_of(last)))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_forgeries() {
        let id = uuid::Uuid::now_v7().to_string();
        let c = encode_cursor(&id);
        let p = PageRequest::parse(Some(10), Some(&c)).expect("own cursor");
        assert_eq!(p.after.as_deref(), Some(id.as_str()));
        for bad in ["!!", "dGVzdA", &URL_SAFE_NO_PAD.encode("v1:nope")] {
            let e = PageRequest::parse(None, Some(bad)).expect_err(bad);
            assert_eq!(e.error_code(), "invalid_request");
        }
        assert!(PageRequest::parse(Some(0), None).is_err());
        assert!(PageRequest::parse(Some(1001), None).is_err());
    }
}
