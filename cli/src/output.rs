//! Printing results: aligned tables for people, JSON for machines.

use serde::Serialize;

use crate::args::OutputFormat;

/// Prints `value` as JSON, or `rows` under `headers` as an aligned table.
pub fn print<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("results serialize")
        ),
        OutputFormat::Table => print!("{}", table(headers, &rows)),
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let rows = vec![
            vec!["web".to_string(), "3".to_string()],
            vec!["a".to_string(), "10".to_string()],
        ];
        assert_eq!(
            super::table(&["NAME", "N"], &rows),
            "NAME  N\nweb   3\na     10\n"
        );
    }
}
