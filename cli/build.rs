//! Stamps the binary with the commit it was built from, for `skiff --version`:
//! `SKIFF_GIT_COMMIT` when set (a build from a source tarball), else
//! `git rev-parse --short HEAD`, else "unknown" (no git, or not a checkout).
//! Cargo reruns this only when HEAD or the branch it points to moves, so an
//! ordinary rebuild does not run git at all.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Tells cargo to rerun when `path` (relative to the git dir, as
/// `git rev-parse --git-path` resolves it for worktrees) changes. A file
/// that does not exist is left out: cargo would rerun on every build.
fn watch_git_path(name: &str) {
    if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name]) {
        if PathBuf::from(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=SKIFF_GIT_COMMIT");
    let commit = match std::env::var("SKIFF_GIT_COMMIT") {
        Ok(commit) if !commit.is_empty() => commit,
        _ => {
            watch_git_path("HEAD");
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch_git_path(&branch);
            }
            watch_git_path("packed-refs");
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=SKIFF_GIT_COMMIT={commit}");
}
