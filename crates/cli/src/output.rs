//! Printing results: aligned tables for people, JSON for scripts.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// A table: a header and rows of cells.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let mut out = String::new();
        let line = |cells: Vec<&str>, out: &mut String| {
            let last = cells.len().saturating_sub(1);
            for (i, c) in cells.iter().enumerate() {
                out.push_str(c);
                if i < last {
                    out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
                }
            }
            out.push('\n');
        };
        line(self.header.clone(), &mut out);
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect(), &mut out);
        }
        out
    }
}

/// Prints `value` as JSON, or as the table `table` builds.
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> Table) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Format::Table => print!("{}", table(value).render()),
    }
}

/// What a delete prints: `{"deleted": NAME}` as JSON, one row as a table.
pub fn print_deleted(format: Format, name: &str) {
    print(format, &serde_json::json!({ "deleted": name }), |_| {
        fields(vec![("deleted", name.to_string())])
    });
}

/// A key/value table for one resource.
pub fn fields(pairs: Vec<(&'static str, String)>) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in pairs {
        t.row(vec![k.to_string(), v]);
    }
    t
}

pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn bytes(n: u64) -> String {
    stratus_common::ByteCount(n).human()
}

/// An enum as its wire name (`running`, not `Running`).
pub fn wire<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", "STATE"]);
        t.row(vec!["web-1".into(), "running".into()]);
        t.row(vec!["a".into(), "stopped".into()]);
        assert_eq!(t.render(), "NAME   STATE\nweb-1  running\na      stopped\n");
    }
}
