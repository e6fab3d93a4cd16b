//! Resource names: what operators type instead of ids.
//!
//! A name is 1–63 characters of lowercase ASCII letters, digits and `-`,
//! starts with a letter and does not end with `-` (a DNS label, so a VM name
//! can become a host name). Because names start with a letter and ids are
//! UUIDs, "name or id" lookups need a UUID parse, never a guess.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name must not be empty")]
    Empty,
    #[error("name is {0} characters long; the limit is 63")]
    TooLong(usize),
    #[error("name must start with a lowercase letter")]
    BadStart,
    #[error("name must not end with '-'")]
    BadEnd,
    #[error("name may contain only lowercase letters, digits and '-' (found {0:?})")]
    BadChar(char),
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        if s.len() > 63 {
            return Err(NameError::TooLong(s.len()));
        }
        if !first.is_ascii_lowercase() {
            return Err(NameError::BadStart);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::BadChar(c));
        }
        if s.ends_with('-') {
            return Err(NameError::BadEnd);
        }
        Ok(Name(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'s> utoipa::ToSchema<'s> for Name {
    fn schema() -> (
        &'s str,
        utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
    ) {
        (
            "Name",
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::SchemaType::String)
                .pattern(Some("^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"))
                .min_length(Some(1))
                .max_length(Some(63))
                .description(Some(
                    "A resource name: lowercase letters, digits and '-', starting with a letter.",
                ))
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web-1", "db01", &"x".repeat(63)] {
            assert!(ok.parse::<Name>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!("".parse::<Name>(), Err(NameError::Empty));
        assert_eq!("1abc".parse::<Name>(), Err(NameError::BadStart));
        assert_eq!("Web".parse::<Name>(), Err(NameError::BadStart));
        assert_eq!("web-".parse::<Name>(), Err(NameError::BadEnd));
        assert_eq!("we_b".parse::<Name>(), Err(NameError::BadChar('_')));
        assert_eq!("x".repeat(64).parse::<Name>(), Err(NameError::TooLong(64)));
        // A UUID can never be a name, so name-or-id lookups are unambiguous.
        assert!("0190b6d2-7f0e-7c3a-9d6b-2f8e1f2a3b4c"
            .parse::<Name>()
            .is_err());
    }
}
