//! psql-style aligned tables. Hand-written rather than a table crate because
//! users know psql's exact layout (right-aligned numbers, `(N rows)` footer)
//! and no crate renders it.

use std::io::{self, Write};

use pglite_cache::{QueryResult, oid};

fn is_numeric(type_oid: u32) -> bool {
    matches!(type_oid, oid::INT2 | oid::INT4 | oid::INT8 | oid::OID | oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC)
}

/// Writes a result: a table for row results, the command tag otherwise.
pub fn write(out: &mut impl Write, result: &QueryResult) -> io::Result<()> {
    if !result.has_rows() {
        return writeln!(out, "{}", result.command);
    }
    let cells: Vec<Vec<&str>> =
        result.rows.iter().map(|row| (0..row.len()).map(|i| row.get_text(i).unwrap_or("")).collect()).collect();
    let widths: Vec<usize> = result
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.name.chars().count()]).max().unwrap_or(0))
        .collect();
    let header: Vec<String> = result.columns.iter().zip(&widths).map(|(c, w)| center(&c.name, *w)).collect();
    writeln!(out, " {}", header.join(" | ").trim_end())?;
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
    writeln!(out, "{}", rule.join("+"))?;
    for row in &cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .zip(result.columns.iter())
            .map(|((cell, w), c)| if is_numeric(c.type_oid) { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
            .collect();
        writeln!(out, " {}", line.join(" | ").trim_end())?;
    }
    let n = result.rows.len();
    writeln!(out, "({n} row{})\n", if n == 1 { "" } else { "s" })
}

fn center(text: &str, width: usize) -> String {
    let pad = width.saturating_sub(text.chars().count());
    format!("{}{}{}", " ".repeat(pad / 2), text, " ".repeat(pad - pad / 2))
}
