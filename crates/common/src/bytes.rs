//! Byte counts with binary units, as operators type them (`256MiB`, `1GiB`,
//! `40G`) and as the API carries them (a plain integer number of bytes).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A number of bytes. Serialized as a plain integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteCount(pub u64);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// Why a size string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ByteCountParseError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} does not start with a number")]
    NoNumber(String),
    #[error("unknown size unit {0:?} (use B, KiB, MiB, GiB or TiB)")]
    UnknownUnit(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl ByteCount {
    pub fn from_mib(n: u64) -> Self {
        Self(n * MIB)
    }
    pub fn from_gib(n: u64) -> Self {
        Self(n * GIB)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl ByteCount {
    /// A short, rounded form for tables (`23.5GiB`); exact values print as
    /// [`Display`](fmt::Display) does.
    pub fn human(self) -> String {
        let n = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= size {
                if n.is_multiple_of(size) {
                    return format!("{}{}", n / size, unit);
                }
                return format!("{:.1}{}", n as f64 / size as f64, unit);
            }
        }
        format!("{n}B")
    }
}

impl FromStr for ByteCount {
    type Err = ByteCountParseError;

    /// Parses `N[unit]`. Units are binary whether or not the `i` is written
    /// (`1G` is 1 GiB), because every size an operator gives Stratus (memory,
    /// disks) is binary in practice and QEMU reads them the same way.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ByteCountParseError::Empty);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(ByteCountParseError::NoNumber(s.to_string()));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| ByteCountParseError::Overflow(s.to_string()))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => KIB,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            "t" | "tb" | "tib" => TIB,
            _ => return Err(ByteCountParseError::UnknownUnit(unit.trim().to_string())),
        };
        n.checked_mul(mult)
            .map(ByteCount)
            .ok_or_else(|| ByteCountParseError::Overflow(s.to_string()))
    }
}

impl fmt::Display for ByteCount {
    /// The largest binary unit that divides the count exactly, so the printed
    /// form parses back to the same number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{}", n / size, unit);
            }
        }
        write!(f, "{n}B")
    }
}

impl ByteCount {
    /// For people, not for parsing back: the exact form when a unit
    /// divides the count (`64MiB`, `0B`), else one decimal of the largest
    /// unit it reaches (`147.4MiB`, not `154588797B`). Progress and job
    /// messages use it.
    pub fn approx(self) -> Approx {
        Approx(self.0)
    }
}

/// See [`ByteCount::approx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approx(u64);

impl fmt::Display for Approx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= size {
                if n.is_multiple_of(size) {
                    return write!(f, "{}{}", n / size, unit);
                }
                return write!(f, "{:.1}{}", n as f64 / size as f64, unit);
            }
        }
        write!(f, "{n}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approx_is_exact_when_it_can_be_and_short_otherwise() {
        assert_eq!(ByteCount(64 * MIB).approx().to_string(), "64MiB");
        assert_eq!(ByteCount(0).approx().to_string(), "0B");
        assert_eq!(ByteCount(512).approx().to_string(), "512B");
        assert_eq!(ByteCount(154_588_797).approx().to_string(), "147.4MiB");
        assert_eq!(ByteCount(4416 * KIB).approx().to_string(), "4.3MiB");
        assert_eq!(ByteCount(GIB + 1).approx().to_string(), "1.0GiB");
    }

    #[test]
    fn parses_binary_units() {
        assert_eq!("256MiB".parse::<ByteCount>(), Ok(ByteCount(256 * MIB)));
        assert_eq!("1GiB".parse::<ByteCount>(), Ok(ByteCount(GIB)));
        assert_eq!("1G".parse::<ByteCount>(), Ok(ByteCount(GIB)));
        assert_eq!("4096".parse::<ByteCount>(), Ok(ByteCount(4096)));
        assert_eq!(" 2 TiB ".parse::<ByteCount>(), Ok(ByteCount(2 * TIB)));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!("".parse::<ByteCount>(), Err(ByteCountParseError::Empty));
        assert!(matches!(
            "GiB".parse::<ByteCount>(),
            Err(ByteCountParseError::NoNumber(_))
        ));
        assert!(matches!(
            "5 parsecs".parse::<ByteCount>(),
            Err(ByteCountParseError::UnknownUnit(_))
        ));
        assert!(matches!(
            "99999999999999999999TiB".parse::<ByteCount>(),
            Err(ByteCountParseError::Overflow(_))
        ));
        assert!(matches!(
            "20000000TiB".parse::<ByteCount>(),
            Err(ByteCountParseError::Overflow(_))
        ));
    }

    #[test]
    fn human_rounds_for_tables() {
        assert_eq!(ByteCount(24684084 * KIB).human(), "23.5GiB");
        assert_eq!(ByteCount(GIB).human(), "1GiB");
        assert_eq!(ByteCount(1500).human(), "1.5KiB");
        assert_eq!(ByteCount(12).human(), "12B");
    }

    #[test]
    fn display_round_trips() {
        for n in [0, 1, 1023, KIB, 3 * MIB, 256 * MIB, GIB + 1, 5 * TIB] {
            let s = ByteCount(n).to_string();
            assert_eq!(s.parse::<ByteCount>(), Ok(ByteCount(n)), "{s}");
        }
    }
}
