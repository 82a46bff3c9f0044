//! dkv-cask beside its peers (redb, fjall, sled; RocksDB with the
//! `rocksdb` feature) on identical workloads, in one run.
//!
//! Repetitions are interleaved: repetition 1 runs every engine, then
//! repetition 2 runs every engine (in a rotated order), and so on, so that
//! drift of the machine hits every engine alike. Each row reports the median
//! over the repetitions with the minimum and maximum.
//!
//! `cargo run --release -- --help` lists the flags; every one has a default.

mod engines;
mod report;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use engines::{Durability, Engine};

/// Flags; every one has a default.
#[derive(Parser, Debug, Clone)]
#[command(about = "dkv-cask beside redb, fjall, sled (and RocksDB) on identical workloads")]
pub struct Args {
    /// Keys of the 100-byte-value rows.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Repetitions (each runs every engine once).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Engines to run, comma-separated (dkv-cask, redb, fjall, sled; rocksdb
    /// when built with `--features rocksdb`). Default: all built in.
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Seconds of sync puts per engine and row, in turns of 250 ms (a row
    /// takes about this times the number of engines, plus one).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Random gets per get row (default: as many as keys, at most 500k).
    #[arg(long)]
    pub gets: Option<u64>,
    /// 100-key prefix scans.
    #[arg(long, default_value_t = 10_000)]
    pub scans: u64,
    /// Keys of the 4 KiB-value rows.
    #[arg(long, default_value_t = 200_000)]
    pub big_keys: u64,
    /// Folder in which the stores are made (default: the system temp
    /// folder). Use a folder on the disk you want to measure.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub const VALUE: usize = 100;
pub const BIG_VALUE: usize = 4096;
pub const KEY: usize = 16;

/// What each row measures, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    SeqFill,
    RandFill,
    Sync1,
    Sync4,
    Get1,
    Get2,
    Missing,
    Scan,
    SpaceBefore,
    SpaceAfter,
    SpaceClosed,
    ReportedBefore,
    ReportedAfter,
    CompactSeconds,
    Reopen,
    BigFill,
    DiskWrite,
    BigGet,
    DiskSync,
}

/// All measurements: metric → engine → one figure per repetition.
pub type Results = BTreeMap<Metric, BTreeMap<String, Vec<f64>>>;

/// A small xorshift generator: fast, deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn permutation(&mut self, n: u64) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// Key `i`: 16 decimal digits, so that 100 consecutive keys share their
/// first 14 bytes (as `dkv-cask bench` makes them).
pub fn key(i: u64) -> [u8; KEY] {
    use std::io::Write;
    let mut k = [0u8; KEY];
    write!(&mut k[..], "{i:016}").expect("16 digits fit");
    k
}

/// Incompressible values: windows of a 16 MiB pool of random bytes, at an
/// offset that depends on the key and the round, so that no two values
/// near each other in a block share bytes a compressor could find.
pub struct Values {
    pool: Vec<u8>,
}

impl Values {
    const POOL: usize = 16 << 20;

    fn new() -> Self {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut pool = Vec::with_capacity(Self::POOL + BIG_VALUE);
        while pool.len() < Self::POOL + BIG_VALUE {
            pool.extend_from_slice(&rng.next().to_le_bytes());
        }
        Values { pool }
    }

    fn get(&self, i: u64, round: u64, size: usize) -> &[u8] {
        let mut h = (i ^ (round << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        let at = (h % (Self::POOL as u64)) as usize;
        &self.pool[at..at + size]
    }
}

fn progress(msg: &str) {
    use std::io::Write;
    eprint!("\r\x1b[2Kpeers: {msg}");
    let _ = std::io::stderr().flush();
}

/// Sum of the sizes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += dir_bytes(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}

/// Prints every file under `dir` with its size (set `PEERS_DIAGNOSE`).
fn list_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            list_files(&entry.path());
        } else {
            eprintln!("\n  {:>12} {}", meta.len(), entry.path().display());
        }
    }
}

fn rate(ops: u64, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Random gets of `keys` from `threads` threads; ops/s. Every key must be
/// found (or, when `missing`, none).
fn gets(engine: &dyn Engine, keys: &[u64], threads: usize, missing: bool) -> f64 {
    let chunk = keys.len().div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in keys.chunks(chunk) {
            s.spawn(move || {
                for &i in part {
                    let found = engine.get(&key(i));
                    assert_eq!(found.is_none(), missing, "get of key {i}");
                }
            });
        }
    });
    rate(keys.len() as u64, start.elapsed())
}

/// Puts of new keys from `writers` threads for `time`: how many, in how
/// long.
fn sync_puts(
    engine: &dyn Engine,
    values: &Values,
    writers: usize,
    time: Duration,
    next: &mut u64,
) -> (u64, Duration) {
    let base = *next;
    let start = Instant::now();
    let deadline = start + time;
    let counts: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers as u64)
            .map(|t| {
                s.spawn(move || {
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let k = base + t + i * writers as u64;
                        engine.put(&key(k), values.get(k, 9, VALUE));
                        i += 1;
                    }
                    i
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect()
    });
    let elapsed = start.elapsed();
    *next += (counts.iter().max().copied().unwrap_or(0) + 1) * writers as u64;
    (counts.iter().sum(), elapsed)
}

/// Length of one slice of the sync rows.
pub const SYNC_SLICE: Duration = Duration::from_millis(250);

/// How long the sync rows wait after opening every store, and after one
/// synced put into each, before timing: what an engine starts at open
/// (dkv-cask zero-fills its next segment in the background) finishes
/// before the first turn.
const SYNC_SETTLE: Duration = Duration::from_secs(2);

/// The sync rows of one repetition: every engine's store open at once, the
/// engines taking turns of [`SYNC_SLICE`], each round in a new random order
/// (so that no engine always follows the same one), `--seconds` per engine
/// and row in all, and the raw 4 KiB `pwrite` + `fdatasync` reference
/// taking its turns in the 1-writer row. The disk's rate drifts by a fifth
/// within seconds here; turns this short make the drift hit every engine
/// alike, which runs minutes apart did not. During a turn the other stores
/// take no calls (their own background threads may run).
fn sync_rows(root: &Path, plan: &Plan, rep: usize, results: &mut Results) {
    let args = &plan.args;
    let dir = root.join("sync");
    let stores: Vec<Box<dyn Engine>> = args
        .engines
        .iter()
        .map(|name| engines::open(name, &dir.join(name), Durability::Sync))
        .collect();
    let raw = RawSync::new(&dir);
    let mut next = vec![0u64; stores.len()];
    for (j, e) in stores.iter().enumerate() {
        e.put(&key(next[j]), plan.values.get(next[j], 9, VALUE));
        next[j] += 1;
    }
    std::thread::sleep(SYNC_SETTLE);
    let slices = (args.seconds / SYNC_SLICE.as_secs_f64()).ceil().max(1.0) as usize;
    let mut rng = Rng(0x5EED_0000 + rep as u64);
    for (metric, writers) in [(Metric::Sync1, 1), (Metric::Sync4, 4)] {
        progress(&format!(
            "rep {rep}/{}: sync puts, {writers} writer(s), engines taking turns",
            args.reps
        ));
        // One more turn for the raw reference in the 1-writer row.
        let turns = stores.len() + usize::from(writers == 1);
        let mut ops = vec![0u64; turns];
        let mut time = vec![Duration::ZERO; turns];
        for _ in 0..slices {
            for j in rng.permutation(turns as u64) {
                let j = j as usize;
                let (n, t) = match stores.get(j) {
                    Some(e) => {
                        sync_puts(e.as_ref(), &plan.values, writers, SYNC_SLICE, &mut next[j])
                    }
                    None => raw.run(SYNC_SLICE),
                };
                ops[j] += n;
                time[j] += t;
            }
        }
        for (j, name) in args.engines.iter().enumerate() {
            record(results, metric, name, rate(ops[j], time[j]));
        }
        if writers == 1 {
            let j = stores.len();
            record(results, Metric::DiskSync, "disk", rate(ops[j], time[j]));
        }
    }
    for e in stores {
        e.close();
    }
    drop(raw);
    std::fs::remove_dir_all(&dir).expect("remove sync stores");
}

/// Files one figure.
fn record(results: &mut Results, m: Metric, who: &str, v: f64) {
    results
        .entry(m)
        .or_default()
        .entry(who.to_string())
        .or_default()
        .push(v);
}

/// The disk's own rate of 4 KiB `pwrite` + `fdatasync` into a preallocated
/// (zero-filled, synced) file: a reference for the sync rows.
struct RawSync {
    file: std::fs::File,
    path: PathBuf,
    at: std::cell::Cell<u64>,
}

impl RawSync {
    const FILE: u64 = 64 << 20;

    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("sync folder");
        let path = dir.join("raw-fdatasync");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("raw file");
        let zeros = vec![0u8; 1 << 20];
        for i in 0..Self::FILE >> 20 {
            file.write_all_at(&zeros, i << 20).expect("raw write");
        }
        file.sync_all().expect("raw fsync");
        RawSync {
            file,
            path,
            at: std::cell::Cell::new(0),
        }
    }

    fn run(&self, time: Duration) -> (u64, Duration) {
        let block = [0xA5u8; 4096];
        let start = Instant::now();
        let mut ops = 0u64;
        while start.elapsed() < time {
            let at = self.at.get();
            self.file
                .write_all_at(&block, (at * 4096) % Self::FILE)
                .expect("raw write");
            self.file.sync_data().expect("raw fdatasync");
            self.at.set(at + 1);
            ops += 1;
        }
        (ops, start.elapsed())
    }
}

impl Drop for RawSync {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The disk's rate of writing `bytes` sequentially in 1 MiB writes to a
/// new file, then `fsync`; MB/s.
fn raw_sequential_rate(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("raw-sequential");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("raw file");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let block: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
    let start = Instant::now();
    let mut at = 0;
    while at < bytes {
        file.write_all_at(&block, at).expect("raw write");
        at += block.len() as u64;
    }
    file.sync_all().expect("raw fsync");
    let r = at as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).expect("remove raw file");
    r
}

/// Shared inputs of one run.
struct Plan {
    args: Args,
    values: Values,
    fill_order: Vec<u32>,
    overwrite_orders: [Vec<u32>; 2],
    get_keys: Vec<u64>,
    missing_keys: Vec<u64>,
    scan_groups: Vec<u64>,
    big_get_keys: Vec<u64>,
}

/// Every workload on one engine, in a new folder under `root`; each figure
/// is added to `results` under `name`.
fn run_engine(name: &str, root: &Path, plan: &Plan, rep: usize, results: &mut Results) {
    let mut record = |m: Metric, v: f64| {
        // The disk's reference figures are filed under "disk".
        let who = if m == Metric::DiskWrite { "disk" } else { name };
        record(results, m, who, v);
    };
    let args = &plan.args;
    let n = args.keys;
    let values = &plan.values;
    let step = |what: &str| progress(&format!("rep {rep}/{}: {name}: {what}", args.reps));
    let dir = root.join(name);

    // Sequential fill.
    step("sequential fill");
    let engine = engines::open(name, &dir.join("seq"), Durability::None);
    let start = Instant::now();
    for i in 0..n {
        engine.put(&key(i), values.get(i, 0, VALUE));
    }
    record(Metric::SeqFill, rate(n, start.elapsed()));
    engine.close();
    std::fs::remove_dir_all(dir.join("seq")).expect("remove store");

    // Random fill; this store then serves the read rows.
    step("random fill");
    let main = dir.join("main");
    let mut engine = engines::open(name, &main, Durability::None);
    let start = Instant::now();
    for &i in &plan.fill_order {
        let i = u64::from(i);
        engine.put(&key(i), values.get(i, 0, VALUE));
    }
    record(Metric::RandFill, rate(n, start.elapsed()));
    engine.sync();

    step("random gets, 1 thread");
    record(
        Metric::Get1,
        gets(engine.as_ref(), &plan.get_keys, 1, false),
    );
    step("random gets, 2 threads");
    record(
        Metric::Get2,
        gets(engine.as_ref(), &plan.get_keys, 2, false),
    );
    step("missing-key gets");
    record(
        Metric::Missing,
        gets(engine.as_ref(), &plan.missing_keys, 1, true),
    );
    step("100-key prefix scans");
    let start = Instant::now();
    for &g in &plan.scan_groups {
        let k = key(g * 100);
        assert_eq!(engine.scan(&k[..14]), 100, "scan of group {g}");
    }
    record(
        Metric::Scan,
        rate(plan.scan_groups.len() as u64 * 100, start.elapsed()),
    );

    // Reopen of the 1M-key store, to the first answered get.
    step("reopen");
    engine.close();
    let start = Instant::now();
    engine = engines::open(name, &main, Durability::None);
    assert!(engine.get(&key(n / 2)).is_some(), "get after reopen");
    record(Metric::Reopen, start.elapsed().as_secs_f64() * 1e3);

    // Space: every key written three times, before and after compaction.
    for (round, order) in plan.overwrite_orders.iter().enumerate() {
        step(&format!("overwrite round {} of 2", round + 1));
        for &i in order {
            let i = u64::from(i);
            engine.put(&key(i), values.get(i, round as u64 + 1, VALUE));
        }
    }
    engine.sync();
    let live = (n * (KEY + VALUE) as u64) as f64;
    record(Metric::SpaceBefore, dir_bytes(&main) as f64 / live);
    if let Some(b) = engine.reported_disk_bytes() {
        record(Metric::ReportedBefore, b as f64 / live);
    }
    step("compaction");
    let start = Instant::now();
    if engine.compact() {
        record(Metric::CompactSeconds, start.elapsed().as_secs_f64());
    }
    record(Metric::SpaceAfter, dir_bytes(&main) as f64 / live);
    if std::env::var_os("PEERS_DIAGNOSE").is_some() {
        // Not in the table: the files left after compaction, and scans
        // again now that the engine has rewritten its data.
        list_files(&main);
        let start = Instant::now();
        for &g in &plan.scan_groups {
            let k = key(g * 100);
            assert_eq!(engine.scan(&k[..14]), 100, "scan of group {g}");
        }
        let r = rate(plan.scan_groups.len() as u64 * 100, start.elapsed());
        eprintln!("\n{name}: 100-key prefix scans after compaction: {r:.0} keys/s");
    }
    if let Some(b) = engine.reported_disk_bytes() {
        record(Metric::ReportedAfter, b as f64 / live);
    }
    assert!(engine.get(&key(n - 1)).is_some(), "get after compaction");
    engine.close();
    record(Metric::SpaceClosed, dir_bytes(&main) as f64 / live);
    std::fs::remove_dir_all(&main).expect("remove store");

    // 4 KiB values: a sequential fill made durable at its end, then gets.
    // dkv-cask's target is a fraction of the disk's raw rate, which varies a
    // lot on this machine: measure it right before dkv-cask's fill.
    let bytes = args.big_keys * (KEY + BIG_VALUE) as u64;
    if name == "dkv-cask" {
        step("raw sequential write");
        let disk = raw_sequential_rate(root, bytes.max(1 << 20));
        record(Metric::DiskWrite, disk);
    }
    step("4 KiB fill");
    let big = dir.join("big");
    let engine = engines::open(name, &big, Durability::None);
    let start = Instant::now();
    for i in 0..args.big_keys {
        engine.put(&key(i), values.get(i, 0, BIG_VALUE));
    }
    engine.sync();
    record(
        Metric::BigFill,
        bytes as f64 / 1e6 / start.elapsed().as_secs_f64(),
    );
    step("4 KiB random gets");
    record(
        Metric::BigGet,
        gets(engine.as_ref(), &plan.big_get_keys, 1, false),
    );
    engine.close();
    std::fs::remove_dir_all(&big).expect("remove store");
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let mut args = Args::parse();
    if args.engines.is_empty() {
        args.engines = engines::ALL.iter().map(|s| s.to_string()).collect();
    }
    for e in &args.engines {
        assert!(
            engines::ALL.contains(&e.as_str()),
            "unknown engine {e:?}; built in: {:?} (rocksdb needs --features rocksdb)",
            engines::ALL
        );
    }
    let n = args.keys.max(100) / 100 * 100;
    args.keys = n;
    let gets_n = args.gets.unwrap_or(n.min(500_000));
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let get_keys: Vec<u64> = (0..gets_n).map(|_| rng.next() % n).collect();
    let missing_keys: Vec<u64> = (0..gets_n).map(|_| n + rng.next() % n).collect();
    let scan_groups: Vec<u64> = (0..args.scans).map(|_| rng.next() % (n / 100)).collect();
    let big_get_keys: Vec<u64> = (0..args.big_keys)
        .map(|_| rng.next() % args.big_keys)
        .collect();
    let plan = Plan {
        values: Values::new(),
        fill_order: rng.permutation(n),
        overwrite_orders: [rng.permutation(n), rng.permutation(n)],
        get_keys,
        missing_keys,
        scan_groups,
        big_get_keys,
        args: args.clone(),
    };
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("dkv-cask-peers-")
        .tempdir_in(&parent)
        .expect("temp folder");

    let started = Instant::now();
    let mut results = Results::new();
    for rep in 0..args.reps {
        sync_rows(root.path(), &plan, rep + 1, &mut results);
        // Rotate the order each repetition, so no engine always goes first.
        let k = args.engines.len();
        for j in 0..k {
            let name = &args.engines[(j + rep) % k];
            run_engine(name, root.path(), &plan, rep + 1, &mut results);
        }
    }
    eprintln!();
    let text = report::render(&args, &parent, &results, started.elapsed());
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text).expect("write --out file");
        eprintln!("peers: wrote {}", out.display());
    }
}
