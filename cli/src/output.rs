//! Printing results: aligned tables for people, JSON or YAML for machines;
//! and what a failed write to stdout means (`skiff events | head -1`).

use std::fmt;
use std::io::{self, IsTerminal, Write};

use serde::Serialize;

use crate::args::OutputFormat;

/// Prints `value` as JSON or YAML, or `rows` under `headers` as an aligned table.
pub fn print<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) {
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(json) => println!("{json}"),
            Err(err) => write_failed(&io::Error::other(err)),
        },
        OutputFormat::Yaml => match serde_yaml::to_string(value) {
            Ok(yaml) => print!("{yaml}"),
            Err(err) => write_failed(&io::Error::other(err)),
        },
        OutputFormat::Table => print!("{}", table(headers, &rows)),
    }
}

/// Starts one frame of a `--watch` redraw: on a terminal the screen is
/// cleared first (as watch(1) does), elsewhere (a pipe, a file) frames
/// follow each other, a blank line apart, so that none is lost.
pub fn redraw_begin(title: &str) {
    if io::stdout().is_terminal() {
        print!("\x1b[H\x1b[2J{title}\n\n");
    } else {
        print!("\n{title}\n");
    }
}

/// Writes to stdout; every `print!` and `println!` of the CLI comes here
/// (`main.rs` shadows std's, which panic when the write fails).
///
/// A reader that went away (EPIPE: `| head -1`) ends the process quietly
/// with status 141, what a shell reports for `docker` or `kubectl` in the
/// same place: they are killed by SIGPIPE (128 + 13). Rust ignores SIGPIPE,
/// and restoring it would need unsafe code, so the status is exited with.
/// Any other failure (`> /dev/full`) ends it with a one-line `error:`.
pub fn stdout(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(err) = out.write_fmt(args).and_then(|()| out.flush()) {
        write_failed(&err);
    }
}

/// Writes to stderr; a failure is ignored, there is nowhere left to say it.
pub fn stderr(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Ends the process after a failed write to stdout (see [`stdout`]).
pub fn write_failed(err: &io::Error) -> ! {
    match failure(err) {
        WriteFailure::ReaderGone => std::process::exit(SIGPIPE_STATUS),
        WriteFailure::Error(message) => {
            stderr(format_args!("error: {message}\n"));
            std::process::exit(1)
        }
    }
}

/// The status of a process killed by SIGPIPE, as a shell reports it.
pub const SIGPIPE_STATUS: i32 = 141;

/// What a failed write to stdout means.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// The reader closed its end: nothing wrong, it has what it wanted.
    ReaderGone,
    /// Anything else, as the one line to print.
    Error(String),
}

pub fn failure(err: &io::Error) -> WriteFailure {
    if err.kind() == io::ErrorKind::BrokenPipe {
        WriteFailure::ReaderGone
    } else {
        WriteFailure::Error(format!("failed to write the output: {err}"))
    }
}

/// `cell` with control characters escaped (`\n`, `\t`, `\x1b`…): a value
/// from a spec (a command, a message) must neither break a table's rows
/// nor reach the terminal as an escape sequence.
pub fn printable(cell: &str) -> std::borrow::Cow<'_, str> {
    if !cell.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(cell);
    }
    let mut out = String::with_capacity(cell.len() + 8);
    for c in cell.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = &rows;
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
    use std::io;

    use super::{failure, WriteFailure};

    #[test]
    fn a_reader_that_went_away_is_no_error_and_a_full_disk_is_one() {
        const EPIPE: i32 = 32;
        let pipe = io::Error::from_raw_os_error(EPIPE);
        assert_eq!(failure(&pipe), WriteFailure::ReaderGone);
        let full = io::Error::from_raw_os_error(28);
        assert_eq!(
            failure(&full),
            WriteFailure::Error(
                "failed to write the output: No space left on device (os error 28)".into()
            )
        );
    }

    #[test]
    fn control_characters_in_cells_are_escaped_and_keep_one_row_per_line() {
        let rows = vec![vec!["web".to_string(), "sh -c 'a\nb'\u{1b}[2J".to_string()]];
        assert_eq!(
            super::table(&["NAME", "COMMAND"], &rows),
            "NAME  COMMAND\nweb   sh -c 'a\\nb'\\x1b[2J\n"
        );
    }

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
