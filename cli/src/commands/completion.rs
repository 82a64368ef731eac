//! `skiff completion SHELL`: the shell completion script, generated from
//! the same clap definitions that parse the command line, so it never
//! lags behind a new flag or choice.

use clap::CommandFactory;

use crate::args::Cli;

pub fn run(shell: clap_complete::Shell) {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "skiff", &mut script);
    print!("{}", String::from_utf8_lossy(&script));
}
