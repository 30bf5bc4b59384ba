//! `pglite-cache completions SHELL` and `pglite-cache man`: shell
//! completions and manual pages generated from the command-line definition,
//! so they never drift from `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;

/// Raw `man` flags.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write one page per command (`pglite-cache.1`, `pglite-cache-sync.1`,
    /// ...) into this directory instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = super::Cli::command();
    clap_complete::generate(shell, &mut command, "pglite-cache", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Prints the main manual page, or writes every page into a directory.
pub fn man(args: ManArgs) -> ExitCode {
    let command = super::Cli::command();
    let written = match &args.dir {
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir)),
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the manual: {e}");
            ExitCode::FAILURE
        }
    }
}
