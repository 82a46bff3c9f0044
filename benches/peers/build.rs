//! Stamps the binary with the dkv-cask revision it was built from (the
//! commit, and whether `src/` had uncommitted changes), for the report.

use std::process::Command;

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let revision = match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "Cargo.toml",
                "build.rs",
                "proto",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("commit {commit} plus uncommitted changes in src/, Cargo.toml or proto/")
            } else {
                format!("commit {commit}")
            }
        }
        None => "unknown revision".into(),
    };
    println!("cargo:rustc-env=CASK_REVISION={revision}");
    for path in [
        "src",
        "Cargo.toml",
        "build.rs",
        "proto",
        ".git/HEAD",
        ".git/refs/heads",
    ] {
        println!("cargo:rerun-if-changed={root}/{path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
