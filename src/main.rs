//! The `dkv-cask` command-line tool: inspect, edit and benchmark a store.

#![deny(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}
