//! `skiff man DIR`: man pages from the clap definitions, one per command
//! in git's layout: `skiff.1`, `skiff-service.1`, `skiff-service-create.1`.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::args::Cli;

/// Writes the pages into `dir` (created if missing) and lists them.
pub fn run(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut command = Cli::command();
    // Propagates the global options into every subcommand's page.
    command.build();
    let mut written = 0;
    write_pages(&command, "skiff", dir, &mut written)?;
    println!(
        "{written} man pages written to {} (e.g. man -l {}/skiff.1)",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// The page of `command`, named `name`, then those of its subcommands
/// (not the hidden ones, nor clap's own `help`).
fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut usize,
) -> anyhow::Result<()> {
    let page_name = name.to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone().name(page_name))
        .render(&mut page)
        .with_context(|| format!("failed to render the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| format!("failed to write {}", path.display()))?;
    *written += 1;
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
