//! Command-line parsing and the data commands. Each command opens the store,
//! does one thing, and reports errors on stderr in one line. Exit codes:
//! 0 success, 1 an engine error, 2 a usage error (from clap), 3 a key not
//! found by `get`.

mod bench;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dkv_cask::serverpb::{CompareAndSetRequest, KvPair};
use dkv_cask::{IterationOptions, KvStore, Options, Store};

/// The default store folder, so the quick start needs no flags.
const DEFAULT_DB: &str = "dkv-cask-data";

#[derive(Parser, Debug)]
#[command(
    name = "dkv-cask",
    version,
    about = "A Bitcask-style storage engine for DKV"
)]
struct Cli {
    /// The store folder.
    #[arg(long, global = true, default_value = DEFAULT_DB)]
    db: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmark the engine on a temporary store and print one table.
    Bench(bench::BenchArgs),
    /// Store a value under a key.
    Put {
        /// The key (UTF-8 text).
        key: String,
        /// The value (UTF-8 text).
        value: String,
        /// Absolute expiry in Unix seconds; 0 never expires.
        #[arg(long, default_value_t = 0)]
        expire_ts: u64,
    },
    /// Print the value of each key found (exit code 3 if none was found).
    Get {
        /// Keys to look up.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Compare-and-set: replace OLD with NEW (an empty OLD creates the key).
    Cas {
        /// The key.
        key: String,
        /// The expected current value ("" = the key must be absent).
        old: String,
        /// The new value.
        new: String,
        /// Absolute expiry in Unix seconds for the new value.
        #[arg(long, default_value_t = 0)]
        expire_ts: u64,
    },
    /// Print keys and values in ascending key order.
    Scan {
        /// Only keys with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start at this key (inclusive).
        #[arg(long, default_value = "")]
        start: String,
        /// At most this many pairs.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Print what the store holds and what recovery did.
    Info,
}

/// Runs the tool and maps errors to exit codes.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dkv-cask: {}", one_line(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn open(db: &PathBuf) -> dkv_cask::Result<Store> {
    Store::open(db, Options::default())
}

fn execute(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Bench(args) => bench::run(&args)?,
        Command::Put {
            key,
            value,
            expire_ts,
        } => {
            let store = open(&cli.db)?;
            store.put(&[KvPair {
                key: key.into_bytes(),
                value: value.into_bytes(),
                expire_ts,
            }])?;
            store.close()?;
        }
        Command::Get { keys } => {
            let store = open(&cli.db)?;
            let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            let found = store.get(&keys)?;
            store.close()?;
            for p in &found {
                writeln!(out, "{}", String::from_utf8_lossy(&p.value))?;
            }
            if found.is_empty() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Delete { key } => {
            let store = open(&cli.db)?;
            store.delete(key.as_bytes())?;
            store.close()?;
        }
        Command::Cas {
            key,
            old,
            new,
            expire_ts,
        } => {
            let store = open(&cli.db)?;
            let swapped = store.compare_and_set(&CompareAndSetRequest {
                key: key.into_bytes(),
                old_value: old.into_bytes(),
                new_value: new.into_bytes(),
                expire_ts,
            })?;
            store.close()?;
            writeln!(out, "{swapped}")?;
        }
        Command::Scan {
            prefix,
            start,
            limit,
        } => {
            let store = open(&cli.db)?;
            let options = IterationOptions::new()
                .with_prefix(prefix.into_bytes())
                .with_start_key(start.into_bytes());
            for pair in store.iter(&options)?.take(limit.unwrap_or(usize::MAX)) {
                let p = pair?;
                writeln!(
                    out,
                    "{}\t{}",
                    String::from_utf8_lossy(&p.key),
                    String::from_utf8_lossy(&p.value)
                )?;
            }
            store.close()?;
        }
        Command::Info => {
            let store = open(&cli.db)?;
            let r = store.recovery_report();
            writeln!(out, "folder: {}", store.dir().display())?;
            writeln!(out, "format version: {}", dkv_cask::format::FORMAT_VERSION)?;
            writeln!(out, "keys: {}", store.key_count())?;
            writeln!(out, "segments: {}", r.segments)?;
            writeln!(out, "last change number: {}", store.last_change_number())?;
            writeln!(out, "index memory: {} bytes", store.index_memory_bytes())?;
            writeln!(
                out,
                "recovery: {} records, {} bytes verified in {:?}",
                r.records, r.bytes_read, r.duration
            )?;
            if let Some(t) = &r.truncated {
                writeln!(
                    out,
                    "torn tail cut: {} bytes at {} of {} ({})",
                    t.bytes,
                    t.offset,
                    t.file.display(),
                    t.reason
                )?;
            }
            for d in &r.skipped {
                writeln!(
                    out,
                    "skipped damage: {}..{} of {} ({})",
                    d.start,
                    d.end,
                    d.file.display(),
                    d.reason
                )?;
            }
            store.close()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
