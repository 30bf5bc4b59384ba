//! The library alone (default features off) pulls in none of the command
//! line's crates. `cargo tree` has no `--lib`: without the `cli` feature the
//! binary is not built at all (`required-features`), so the package's
//! normal dependencies are the library's.

use std::process::Command;

/// Crates only the `pglite-cache` binary needs.
const CLI_ONLY: &[&str] = &[
    "clap",
    "clap_complete",
    "clap_mangen",
    "indicatif",
    "tracing-subscriber",
    "anyhow",
    "tempfile",
    "prometheus",
    "hyper",
    "hyper-util",
    "http-body-util",
];

#[test]
fn the_library_builds_without_any_cli_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--locked",
            "--no-default-features",
            // Our own dependencies: the engine (pglite-oxide, wasmer) brings
            // anyhow, tempfile and even clap (through libtest-mimic) itself.
            "--depth",
            "1",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} tree: {e}"));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let crates: Vec<&str> = tree.lines().filter_map(|line| line.split_whitespace().next()).collect();
    assert!(crates.contains(&"pglite-oxide") && crates.contains(&"tokio-postgres"), "{tree}");
    let found: Vec<&&str> = CLI_ONLY.iter().filter(|c| crates.contains(c)).collect();
    assert!(found.is_empty(), "the library depends on CLI-only crates {found:?}:\n{tree}");
}
