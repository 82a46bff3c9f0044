//! Command-line parsing and the data commands. Each command opens the store,
//! does one thing, and reports errors on stderr in one line. Exit codes:
//! 0 success, 1 an engine error, 2 a usage error (from clap), 3 a key not
//! found by `get`, 4 damage found by `verify`.

mod bench;
mod bench_merge;
mod plot;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dkv_cask::serverpb::{CompareAndSetRequest, KvPair};
use dkv_cask::{ChangePropagator, IterationOptions, KvStore, Options, Store};

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
    /// Print JSON for scripts (get, scan, cas, info, verify): one object
    /// per line, keys and values in base64.
    #[arg(long, global = true)]
    json: bool,
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
    /// Print the store's Prometheus metrics (text exposition).
    Metrics,
    /// Read every record and checksum without changing anything; report
    /// damage by file and offset (exit code 4 when damaged).
    Verify,
    /// Merge sealed segments to give back the space of overwritten,
    /// deleted and expired data (the log followers may need is kept).
    Compact {
        /// Also merge the log the default retention keeps for replication
        /// followers (the newest 1 GiB and the last hour): followers behind
        /// it must then start again from a snapshot.
        #[arg(long)]
        ignore_retention: bool,
    },
    /// Print change records from the log as JSON lines (bytes in base64).
    Changes {
        /// First change number wanted (0: the oldest available).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        max: usize,
        /// Print keys and values as JSON text (invalid UTF-8 is replaced)
        /// instead of base64.
        #[arg(long)]
        text: bool,
    },
    /// Back a store up into a folder (hard links of sealed segments plus a
    /// manifest).
    Backup {
        /// The store folder.
        db: PathBuf,
        /// The backup folder (created if missing; its parent must exist).
        dir: PathBuf,
    },
    /// Restore a backup folder into a store folder (verified first).
    Restore {
        /// The backup folder.
        dir: PathBuf,
        /// The store folder to replace.
        db: PathBuf,
    },
    /// Check a backup's manifest, file sizes and checksums.
    VerifyBackup {
        /// The backup folder.
        dir: PathBuf,
    },
    /// Export or import a whole-keyspace snapshot stream.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Copy changes from a master store to a slave store until caught up.
    Follow {
        /// The master's store folder.
        master: PathBuf,
        /// The slave's store folder (created if missing).
        slave: PathBuf,
        /// Change records per round.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Write a point-in-time snapshot of a store to a file.
    Export {
        /// The store folder.
        db: PathBuf,
        /// The snapshot file to write.
        file: PathBuf,
    },
    /// Replace a store's keyspace with a snapshot file (verified first).
    Import {
        /// The snapshot file to read.
        file: PathBuf,
        /// The store folder.
        db: PathBuf,
    },
}

/// A progress bar on stderr, drawn only when stderr is a terminal (so
/// nothing is printed when output is piped or captured) and at most ten
/// times a second.
struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    shown: Option<std::time::Instant>,
    on: bool,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Progress {
            label,
            total,
            done: 0,
            shown: None,
            on: std::io::stderr().is_terminal(),
        }
    }

    /// Records `done` of `total` bytes.
    fn set(&mut self, done: u64, total: u64) {
        self.done = done;
        self.total = total;
        self.draw();
    }

    /// Records `n` more bytes done.
    fn add(&mut self, n: u64) {
        self.done += n;
        self.draw();
    }

    fn draw(&mut self) {
        if !self.on || self.shown.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        self.shown = Some(std::time::Instant::now());
        eprint!("\r\x1b[2K{}", self.line());
    }

    /// `label [#######-----------]  35%  12.0 / 34.2 MiB`, or without the
    /// bar when the total is unknown.
    fn line(&self) -> String {
        const WIDTH: u64 = 30;
        let mib = |b: u64| b as f64 / 1048576.0;
        match (self.done * 100).checked_div(self.total) {
            Some(pct) => {
                let pct = pct.min(100);
                let filled = (pct * WIDTH / 100) as usize;
                format!(
                    "{} [{}{}] {pct:>3}%  {:.1} / {:.1} MiB",
                    self.label,
                    "#".repeat(filled),
                    "-".repeat(WIDTH as usize - filled),
                    mib(self.done),
                    mib(self.total)
                )
            }
            None => format!("{}: {:.1} MiB", self.label, mib(self.done)),
        }
    }

    fn finish(&self) {
        if self.on {
            eprintln!(
                "\r\x1b[2K{}: {:.1} MiB done",
                self.label,
                self.done as f64 / 1048576.0
            );
        }
    }
}

/// Runs `f` with a progress bar fed by its `(done, total)` callback.
fn with_progress<T>(
    label: &'static str,
    f: impl FnOnce(dkv_cask::Progress<'_>) -> dkv_cask::Result<T>,
) -> dkv_cask::Result<T> {
    let mut bar = Progress::new(label, 0);
    let result = f(&mut |done, total| bar.set(done, total));
    if result.is_ok() {
        bar.finish();
    } else if bar.on && bar.shown.is_some() {
        eprintln!();
    }
    result
}

/// A reader or writer that reports the bytes passing through it.
struct Counted<'a, T> {
    inner: T,
    progress: &'a mut Progress,
}

impl<T: std::io::Read> std::io::Read for Counted<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
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
                if cli.json {
                    writeln!(out, "{}", json::pair(p))?;
                } else {
                    writeln!(out, "{}", String::from_utf8_lossy(&p.value))?;
                }
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
            if cli.json {
                writeln!(out, "{{\"swapped\":{swapped}}}")?;
            } else {
                writeln!(out, "{swapped}")?;
            }
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
                if cli.json {
                    writeln!(out, "{}", json::pair(&p))?;
                    continue;
                }
                writeln!(
                    out,
                    "{}\t{}",
                    String::from_utf8_lossy(&p.key),
                    String::from_utf8_lossy(&p.value)
                )?;
            }
            store.close()?;
        }
        Command::Info if cli.json => {
            let store = open(&cli.db)?;
            let r = store.recovery_report();
            let stats = store.stats()?;
            let merged = stats
                .segments
                .iter()
                .filter(|s| s.kind == dkv_cask::format::SegmentKind::Merged)
                .count();
            writeln!(
                out,
                "{{\"folder\":{},\"format_version\":{},\"keys\":{},\"segments\":{},\"merged_segments\":{},\"live_bytes\":{},\"dead_bytes\":{},\"data_bytes\":{},\"last_change_number\":{},\"durable_change_number\":{},\"applied_change_number\":{},\"index_bytes\":{},\"recovery_records\":{},\"recovery_seconds\":{},\"from_keydir_file\":{},\"segments_from_hints\":{},\"segments_scanned\":{},\"torn_tail_cut\":{},\"damaged_ranges_skipped\":{}}}",
                json::string(&store.dir().display().to_string()),
                dkv_cask::format::FORMAT_VERSION,
                stats.keys,
                stats.segments.len(),
                merged,
                stats.live_bytes,
                stats.dead_bytes,
                stats.data_bytes,
                store.last_change_number(),
                store.durable_change_number(),
                dkv_cask::ChangeApplier::latest_applied_change_number(&store)?,
                store.index_memory_bytes(),
                r.records,
                r.duration.as_secs_f64(),
                r.from_keydir_file,
                r.segments_from_hints,
                r.segments_scanned,
                r.truncated.is_some(),
                r.skipped.len()
            )?;
            store.close()?;
        }
        Command::Info => {
            let store = open(&cli.db)?;
            let r = store.recovery_report();
            writeln!(out, "folder: {}", store.dir().display())?;
            writeln!(out, "format version: {}", dkv_cask::format::FORMAT_VERSION)?;
            let stats = store.stats()?;
            let merged = stats
                .segments
                .iter()
                .filter(|s| s.kind == dkv_cask::format::SegmentKind::Merged)
                .count();
            writeln!(out, "keys: {}", stats.keys)?;
            writeln!(out, "segments: {} ({merged} merged)", stats.segments.len())?;
            writeln!(
                out,
                "bytes: {} live, {} dead ({:.2}x the {} bytes of keys and values)",
                stats.live_bytes,
                stats.dead_bytes,
                stats.space_amplification(),
                stats.data_bytes
            )?;
            writeln!(out, "last change number: {}", store.last_change_number())?;
            writeln!(out, "index memory: {} bytes", store.index_memory_bytes())?;
            if r.from_keydir_file {
                writeln!(
                    out,
                    "open: the index from the keydir file of the last clean close in {:?}",
                    r.duration
                )?;
            } else {
                writeln!(
                    out,
                    "open: {} segments from hints, {} scanned ({} records, {} bytes verified) in {:?}",
                    r.segments_from_hints, r.segments_scanned, r.records, r.bytes_read, r.duration
                )?;
            }
            if let Some(reason) = &r.keydir_file_unused {
                writeln!(out, "keydir file not used: {reason}")?;
            }
            for f in &r.hint_fallbacks {
                writeln!(out, "hint of segment {} not used: {}", f.segment, f.reason)?;
            }
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
        Command::Verify if cli.json => {
            let r = with_progress("verify", |p| dkv_cask::verify_with_progress(&cli.db, p))?;
            let damaged: Vec<String> = r
                .skipped
                .iter()
                .map(|d| {
                    format!(
                        "{{\"file\":{},\"start\":{},\"end\":{},\"reason\":{}}}",
                        json::string(&d.file.display().to_string()),
                        d.start,
                        d.end,
                        json::string(&d.reason)
                    )
                })
                .collect();
            let torn = r.truncated.as_ref().map_or("null".to_string(), |t| {
                format!(
                    "{{\"file\":{},\"offset\":{},\"bytes\":{}}}",
                    json::string(&t.file.display().to_string()),
                    t.offset,
                    t.bytes
                )
            });
            writeln!(
                out,
                "{{\"segments\":{},\"records\":{},\"bytes\":{},\"damaged\":[{}],\"torn_tail\":{torn}}}",
                r.segments,
                r.records,
                r.bytes_read,
                damaged.join(",")
            )?;
            if !r.skipped.is_empty() || r.truncated.is_some() {
                return Ok(ExitCode::from(4));
            }
        }
        Command::Verify => {
            let r = with_progress("verify", |p| dkv_cask::verify_with_progress(&cli.db, p))?;
            writeln!(
                out,
                "{} segments, {} records, {} bytes verified",
                r.segments, r.records, r.bytes_read
            )?;
            for d in &r.skipped {
                writeln!(
                    out,
                    "damaged: {} bytes {}..{}: {}",
                    d.file.display(),
                    d.start,
                    d.end,
                    d.reason
                )?;
            }
            if let Some(t) = &r.truncated {
                writeln!(
                    out,
                    "torn tail: {} from offset {} ({} bytes, {}); the next open cuts it",
                    t.file.display(),
                    t.offset,
                    t.bytes,
                    t.reason
                )?;
            }
            for f in &r.hint_fallbacks {
                writeln!(
                    out,
                    "note: the hint of segment {} is not usable ({}); open reads the segment instead",
                    f.segment, f.reason
                )?;
            }
            if !r.skipped.is_empty() || r.truncated.is_some() {
                return Ok(ExitCode::from(4));
            }
            writeln!(out, "no damage")?;
        }
        Command::Compact { ignore_retention } => {
            let mut options = Options::default();
            if ignore_retention {
                options.retention = dkv_cask::Retention::none();
            }
            options.merge.automatic = false;
            let store = Store::open(&cli.db, options)?;
            let before = store.stats()?;
            let terminal = std::io::stderr().is_terminal();
            let mut runs = 0;
            let report = store.merge_with_hook(&mut |step| {
                if step == dkv_cask::MergeStep::Applied && terminal {
                    runs += 1;
                    eprint!("\r\x1b[2Kcompact: {runs} merged segments written");
                }
                true
            })?;
            if terminal && runs > 0 {
                eprintln!();
            }
            let after = store.stats()?;
            store.close()?;
            if report.runs == 0 {
                writeln!(
                    out,
                    "nothing to merge ({} bytes in {} segments; the log followers may need is kept: \
                     --ignore-retention merges it too)",
                    before.disk_bytes(),
                    before.segments.len()
                )?;
            } else {
                writeln!(
                    out,
                    "merged {} segments into {}: {} -> {} bytes ({:.2}x -> {:.2}x the keys and values) in {:?}",
                    report.segments_merged,
                    report.runs,
                    before.disk_bytes(),
                    after.disk_bytes(),
                    before.space_amplification(),
                    after.space_amplification(),
                    report.duration
                )?;
            }
        }
        Command::Metrics => {
            let registry = prometheus::Registry::new();
            let store = Store::open(
                &cli.db,
                Options {
                    metrics: Some(dkv_cask::MetricsOptions::new(registry.clone())),
                    ..Options::default()
                },
            )?;
            let mut text = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut text,
            )?;
            store.close()?;
            out.write_all(&text)?;
        }
        Command::Changes { from, max, text } => {
            let store = open(&cli.db)?;
            for change in store.load_changes(from, max)? {
                writeln!(out, "{}", json::change(&change, text))?;
            }
            store.close()?;
        }
        Command::Backup { db, dir } => {
            let store = open(&db)?;
            let info = with_progress("backup", |p| store.backup_with_progress(&dir, p))?;
            store.close()?;
            writeln!(
                out,
                "backed up to {} at change number {}: {} files, {:.1} MiB ({} hard-linked) in {:?}",
                dir.display(),
                info.change_number,
                info.files.len(),
                info.bytes() as f64 / 1048576.0,
                info.linked,
                info.duration
            )?;
        }
        Command::Restore { dir, db } => {
            let store = open(&db)?;
            let restored =
                with_progress("verify backup", |p| store.restore_with_progress(&dir, p))?;
            writeln!(
                out,
                "restored {} into {} at change number {}",
                dir.display(),
                db.display(),
                restored.last_change_number()
            )?;
            restored.close()?;
        }
        Command::VerifyBackup { dir } => {
            let info = with_progress("verify backup", |p| {
                dkv_cask::verify_backup_with_progress(&dir, p)
            })?;
            writeln!(
                out,
                "backup {} is intact: change number {}, {} files, {:.1} MiB",
                dir.display(),
                info.change_number,
                info.files.len(),
                info.bytes() as f64 / 1048576.0
            )?;
        }
        Command::Snapshot(SnapshotCommand::Export { db, file }) => {
            let store = open(&db)?;
            let mut reader = store.snapshot()?;
            let at = reader.change_number();
            let mut progress = Progress::new("export", 0);
            let mut f = std::io::BufWriter::new(std::fs::File::create(&file)?);
            let bytes = std::io::copy(
                &mut Counted {
                    inner: &mut reader,
                    progress: &mut progress,
                },
                &mut f,
            )?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            progress.finish();
            drop(reader);
            store.close()?;
            writeln!(
                out,
                "exported {} bytes at change number {at} to {}",
                bytes,
                file.display()
            )?;
        }
        Command::Snapshot(SnapshotCommand::Import { file, db }) => {
            let f = std::fs::File::open(&file)?;
            let total = f.metadata()?.len();
            let mut progress = Progress::new("import", total);
            let store = open(&db)?;
            let at = store.load_snapshot(&mut Counted {
                inner: std::io::BufReader::new(f),
                progress: &mut progress,
            })?;
            progress.finish();
            store.close()?;
            writeln!(
                out,
                "imported {} at change number {at} into {}",
                file.display(),
                db.display()
            )?;
        }
        Command::Follow {
            master,
            slave,
            batch,
        } => {
            let master = open(&master)?;
            let slave = open(&slave)?;
            let quiet = !std::io::stderr().is_terminal();
            let mut total = 0usize;
            let last = dkv_cask::replicate_until_caught_up(&master, &slave, batch.max(1), |p| {
                total += p.changes;
                if !quiet {
                    eprint!(
                        "\r\x1b[2Kfollow: {total} changes, applied {} of {}, lag {}",
                        p.applied, p.master, p.lag
                    );
                }
            })?;
            if !quiet {
                eprintln!();
            }
            writeln!(
                out,
                "applied {} changes; slave at {} of master {}, lag {}",
                total, last.applied, last.master, last.lag
            )?;
            slave.close()?;
            master.close()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// JSON encoding of change records, by hand: the shapes are small and
/// fixed, and bytes go out as base64 (or escaped text).
mod json {
    use dkv_cask::serverpb::ChangeRecord;
    use dkv_cask::serverpb::trxn_record::TrxnType;

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard base64 with padding.
    pub fn base64(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// A JSON string literal of `s`.
    pub fn string(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn bytes(b: &[u8], text: bool) -> String {
        if text {
            string(&String::from_utf8_lossy(b))
        } else {
            string(&base64(b))
        }
    }

    /// One key-value pair as a JSON object, bytes in base64.
    pub fn pair(p: &dkv_cask::serverpb::KvPair) -> String {
        format!(
            "{{\"key\":{},\"value\":{},\"expire_ts\":{}}}",
            bytes(&p.key, false),
            bytes(&p.value, false),
            p.expire_ts
        )
    }

    /// One change record as a JSON object on one line.
    pub fn change(c: &ChangeRecord, text: bool) -> String {
        let trxns: Vec<String> = c
            .trxns
            .iter()
            .map(|t| {
                let kind = TrxnType::try_from(t.r#type).map_or("Invalid", |k| k.as_str_name());
                format!(
                    "{{\"type\":{},\"key\":{},\"value\":{},\"expire_ts\":{}}}",
                    string(kind),
                    bytes(&t.key, text),
                    bytes(&t.value, text),
                    t.expire_ts
                )
            })
            .collect();
        format!(
            "{{\"change_number\":{},\"number_of_trxns\":{},\"serialised_form\":{},\"trxns\":[{}]}}",
            c.change_number,
            c.number_of_trxns,
            string(&base64(&c.serialised_form)),
            trxns.join(",")
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn base64_matches_rfc_4648_test_vectors() {
            let vectors = [
                ("", ""),
                ("f", "Zg=="),
                ("fo", "Zm8="),
                ("foo", "Zm9v"),
                ("foob", "Zm9vYg=="),
                ("fooba", "Zm9vYmE="),
                ("foobar", "Zm9vYmFy"),
            ];
            for (plain, encoded) in vectors {
                assert_eq!(base64(plain.as_bytes()), encoded);
            }
        }

        #[test]
        fn strings_escape_quotes_backslashes_and_control_characters() {
            assert_eq!(string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        }
    }
}
