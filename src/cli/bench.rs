//! `dkv-cask bench`: the engine's benchmark on a temporary store. Each row is
//! printed beside a reference measured in the same run (a `BTreeMap` for the
//! read rows, the disk's raw 4 KiB `pwrite` + `fdatasync` rate for the
//! durable-write rows), so that ratios stay meaningful on a noisy machine.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dkv_cask::serverpb::KvPair;
use dkv_cask::{
    Backupable, ChangeApplier, ChangePropagator, IterationOptions, KvStore, Options, Store,
    SyncMode,
};

/// Which benchmark to run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// Puts, gets, scans, group commit, replication, backup, snapshots.
    Engine,
    /// Open from hints beside scanning, space before and after merge, put
    /// latency during a merge, a large store opened from hints.
    Merge,
}

/// Flags of `dkv-cask bench`; every one has a default.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The benchmark to run.
    #[arg(long, value_enum, default_value_t = Suite::Engine)]
    suite: Suite,
    /// Keys of the large store the merge suite opens from hints; 0 skips it.
    #[arg(long, default_value_t = 10_000_000)]
    big_keys: u64,
    /// Merge write limit for the merge suite's latency rows, in MB/s; 0 for
    /// none (`MergeOptions::bytes_per_second`).
    #[arg(long, default_value_t = 0)]
    merge_mb_per_s: u64,
    /// Keys written by the fill rows and read by the read rows.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Value size in bytes (values are incompressible random bytes).
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Seconds each timed row (durable puts, raw fdatasync) runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Writer thread counts for the `Always` rows.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    writers: Vec<usize>,
    /// Number of 100-key prefix scans.
    #[arg(long, default_value_t = 10_000)]
    scans: u64,
    /// MiB of data (4 KiB values) for the backup and snapshot rows; 0 skips
    /// them.
    #[arg(long, default_value_t = 1024)]
    backup_mib: u64,
    /// Folder in which the temporary stores are made (default: the system
    /// temp folder). Use a folder on the disk you want to measure.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also draw the put and get rows as an SVG plot into this file:
    /// throughput per sync mode and writer count beside the raw fdatasync
    /// rate, and latency CDFs.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

/// One measured row.
pub(super) struct Row {
    pub(super) name: String,
    ops: u64,
    elapsed: Duration,
    /// Per-operation latencies in nanoseconds, sorted.
    pub(super) latencies: Vec<u64>,
    pub(super) reference: Option<(String, f64)>,
    note: String,
}

impl Row {
    pub(super) fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(super) fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64 / 1000.0
    }
}

/// A small xorshift generator: fast, deterministic, no dependency.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(super) fn permutation(&mut self, n: u64) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
        v
    }
}

pub(super) fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    write!(&mut k[..], "{i:016}").expect("16 digits fit");
    k
}

struct Workload {
    values: Vec<u8>,
    value_size: usize,
}

impl Workload {
    fn value(&self, i: u64) -> &[u8] {
        let at = (i.wrapping_mul(2_654_435_761) % 4096) as usize;
        &self.values[at..at + self.value_size]
    }

    fn pair(&self, i: u64) -> KvPair {
        KvPair {
            key: key(i).to_vec(),
            value: self.value(i).to_vec(),
            expire_ts: 0,
        }
    }
}

pub(super) fn progress(msg: &str) {
    eprint!("\r\x1b[2Kbench: {msg}");
    let _ = std::io::stderr().flush();
}

/// Times `f` once per item, returning the row.
fn timed<T>(name: &str, items: impl Iterator<Item = T>, mut f: impl FnMut(T)) -> Row {
    progress(name);
    let mut latencies = Vec::new();
    let start = Instant::now();
    for item in items {
        let t = Instant::now();
        f(item);
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Row {
        name: name.to_string(),
        ops: latencies.len() as u64,
        elapsed,
        latencies,
        reference: None,
        note: String::new(),
    }
}

/// Reopen of the `n`-key store in `dir` to its first answered get, three
/// times from the keydir file its clean close saves, then three times with
/// that file removed (from hints, as after a crash); close is not timed.
fn reopen_row(dir: &Path, n: u64) -> Result<Row, Box<dyn std::error::Error>> {
    let run = |from_hints: bool| -> Result<Row, Box<dyn std::error::Error>> {
        let name = if from_hints {
            "reopen to first get, from hints"
        } else {
            "reopen to first get, clean close"
        };
        progress(name);
        let mut latencies = Vec::new();
        for _ in 0..3 {
            if from_hints {
                match std::fs::remove_file(dir.join(dkv_cask::KEYDIR_FILE)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
            let start = Instant::now();
            let store = Store::open(
                dir,
                Options {
                    sync_mode: SyncMode::Never,
                    ..Options::default()
                },
            )?;
            assert_eq!(store.get(&[&key(n / 2)])?.len(), 1, "a key after reopen");
            latencies.push(start.elapsed().as_nanos() as u64);
            assert_eq!(store.recovery_report().from_keydir_file, !from_hints);
            store.close()?;
        }
        latencies.sort_unstable();
        Ok(Row {
            name: name.into(),
            ops: latencies.len() as u64,
            elapsed: Duration::from_nanos(latencies.iter().sum()),
            latencies,
            reference: None,
            note: String::new(),
        })
    };
    let mut row = run(false)?;
    let hinted = run(true)?;
    row.reference = Some(("reopen from hints".into(), hinted.rate()));
    row.note = format!(
        "{n} keys; p50 is the median of 3 opens: {:.0} ms, from hints {:.0} ms",
        row.percentile(0.5) / 1e3,
        hinted.percentile(0.5) / 1e3
    );
    Ok(row)
}

/// The cost of metrics (DKV's `Stat` and the store collector): the same
/// puts and gets on two stores, one with metrics and one without, in
/// alternating blocks so that drift in the machine's speed hits both alike.
/// Two stores differ by more than metrics (where their index and files
/// landed in memory moves a get by several per cent), so the comparison
/// runs twice: then both stores are reopened with the roles swapped, and
/// the cost is the geometric mean of the two rounds' median block ratios,
/// in which each store's own speed cancels.
fn metrics_rows(
    dir: &Path,
    workload: &Workload,
    n: u64,
    rows: &mut Vec<Row>,
) -> Result<(), Box<dyn std::error::Error>> {
    const BLOCKS: u64 = 20;
    progress("metrics cost: puts and gets with and without metrics");
    let open = |name: &str, metrics: bool| {
        Store::open(
            dir.join(name),
            Options {
                sync_mode: SyncMode::Never,
                metrics: metrics
                    .then(|| dkv_cask::MetricsOptions::new(prometheus::Registry::new())),
                ..Options::default()
            },
        )
    };
    let block = (n / BLOCKS).max(1);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each pair of blocks runs in alternating order, so that neither
    // store always runs first.
    let order = |b: u64| if b.is_multiple_of(2) { [0, 1] } else { [1, 0] };
    // Per round and per operation: (median ratio with/without, median
    // nanoseconds per operation without).
    let mut results = Vec::new();
    for round in 0..2u64 {
        // Round 0: store "a" without metrics, "b" with; round 1 swapped.
        // `stores[0]` is always the one without.
        let stores = if round == 0 {
            [open("a", false)?, open("b", true)?]
        } else {
            [open("b", false)?, open("a", true)?]
        };
        let mut put_ns: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for b in 0..BLOCKS {
            let first = (round * BLOCKS + b) * block;
            let pairs: Vec<KvPair> = (first..first + block).map(|i| workload.pair(i)).collect();
            for s in order(b) {
                let t = Instant::now();
                for p in &pairs {
                    stores[s].put(std::slice::from_ref(p))?;
                }
                put_ns[s].push(t.elapsed().as_nanos() as f64 / block as f64);
            }
        }
        let reads = Rng(0x9E37_79B9 + round).permutation(block * BLOCKS);
        let mut get_ns: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for (b, chunk) in reads.chunks(block as usize).enumerate() {
            for s in order(b as u64) {
                let t = Instant::now();
                for &i in chunk {
                    let k = key(u64::from(i));
                    std::hint::black_box(stores[s].get(&[&k])?);
                }
                get_ns[s].push(t.elapsed().as_nanos() as f64 / chunk.len() as f64);
            }
        }
        for store in stores {
            store.close()?;
        }
        for ns in [put_ns, get_ns] {
            let ratio = median(ns[0].iter().zip(&ns[1]).map(|(off, on)| on / off).collect());
            results.push((round, ratio, median(ns[0].clone())));
        }
    }
    for (i, name) in ["put (Never) with metrics", "get with metrics"]
        .into_iter()
        .enumerate()
    {
        let (_, r0, off0) = results[i];
        let (_, r1, off1) = results[2 + i];
        let ratio = (r0 * r1).sqrt();
        let off = (off0 * off1).sqrt();
        rows.push(Row {
            name: name.into(),
            ops: (1e9 / (off * ratio)) as u64,
            elapsed: Duration::from_secs(1),
            latencies: Vec::new(),
            reference: Some(("same without metrics".into(), 1e9 / off)),
            note: format!(
                "{:+.1}% time per op ({:+.1}% and {:+.1}% with the stores' roles swapped; \
                 medians of {BLOCKS} paired blocks)",
                (ratio - 1.0) * 100.0,
                (r0 - 1.0) * 100.0,
                (r1 - 1.0) * 100.0
            ),
        });
    }
    Ok(())
}

/// Runs the benchmark and prints the table.
pub fn run(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    if args.suite == Suite::Merge {
        return super::bench_merge::run(
            &parent,
            args.keys.max(100),
            args.value_size,
            args.big_keys,
            args.merge_mb_per_s * 1_000_000,
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("dkv-cask-bench-")
        .tempdir_in(&parent)?;
    let n = args.keys.max(100);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let workload = Workload {
        values: (0..4096 + args.value_size)
            .map(|_| rng.next() as u8)
            .collect(),
        value_size: args.value_size,
    };
    let mut rows = Vec::new();

    let store = Store::open(
        tmp.path().join("never"),
        Options {
            sync_mode: SyncMode::Never,
            ..Options::default()
        },
    )?;
    rows.push(timed("sequential put (Never)", 0..n, |i| {
        store.put(&[workload.pair(i)]).expect("put");
    }));
    let order = rng.permutation(n);
    rows.push(timed("random put (Never)", order.iter(), |&i| {
        store.put(&[workload.pair(u64::from(i))]).expect("put");
    }));
    store.sync()?;
    let index_bytes = store.index_memory_bytes();

    progress("building the BTreeMap reference");
    let model: BTreeMap<Vec<u8>, Vec<u8>> = (0..n)
        .map(|i| (key(i).to_vec(), workload.value(i).to_vec()))
        .collect();
    let reads = rng.permutation(n);
    let mut row = timed("random get", reads.iter(), |&i| {
        let k = key(u64::from(i));
        let found = std::hint::black_box(store.get(&[&k]).expect("get"));
        assert_eq!(found.len(), 1);
    });
    let reference = timed("random get (BTreeMap)", reads.iter(), |&i| {
        let k = key(u64::from(i));
        let v = std::hint::black_box(model.get(&k[..]).cloned());
        assert!(v.is_some());
    });
    row.reference = Some(("BTreeMap get + copy".into(), reference.rate()));
    rows.push(row);

    let mut row = timed("missing-key get", reads.iter(), |&i| {
        let k = key(n + u64::from(i));
        assert!(store.get(&[&k]).expect("get").is_empty());
    });
    let reference = timed("missing-key get (BTreeMap)", reads.iter(), |&i| {
        let k = key(n + u64::from(i));
        assert!(!model.contains_key(&k[..]));
    });
    row.reference = Some(("BTreeMap miss".into(), reference.rate()));
    rows.push(row);

    let groups = n / 100;
    let starts: Vec<u64> = (0..args.scans).map(|_| rng.next() % groups).collect();
    let mut row = timed("100-key prefix scan", starts.iter(), |&g| {
        let k = key(g * 100);
        let options = IterationOptions::new().with_prefix(&k[..14]);
        let count = store.iter(&options).expect("iterate").count();
        assert_eq!(count, 100);
    });
    let reference = timed("100-key prefix scan (BTreeMap)", starts.iter(), |&g| {
        let k = key(g * 100);
        let mut count = 0;
        for (key, value) in model
            .range(k.to_vec()..)
            .take_while(|(key, _)| key.starts_with(&k[..14]))
        {
            std::hint::black_box((key.clone(), value.clone()));
            count += 1;
        }
        assert_eq!(count, 100);
    });
    row.reference = Some(("BTreeMap range + copy".into(), reference.rate()));
    row.note = format!("{:.2} M keys/s", row.rate() * 100.0 / 1e6);
    rows.push(row);

    let mut row = timed("100-key prefix scan, lent", starts.iter(), |&g| {
        let k = key(g * 100);
        let options = IterationOptions::new().with_prefix(&k[..14]);
        let mut count = 0;
        store
            .scan(&options, |p| {
                std::hint::black_box((p.key, p.value));
                count += 1;
                true
            })
            .expect("scan");
        assert_eq!(count, 100);
    });
    let reference = timed(
        "100-key prefix scan, lent (BTreeMap)",
        starts.iter(),
        |&g| {
            let k = key(g * 100);
            let mut count = 0;
            for pair in model
                .range(k.to_vec()..)
                .take_while(|(key, _)| key.starts_with(&k[..14]))
            {
                std::hint::black_box(pair);
                count += 1;
            }
            assert_eq!(count, 100);
        },
    );
    row.reference = Some(("BTreeMap range".into(), reference.rate()));
    row.note = format!("{:.2} M keys/s (Store::scan)", row.rate() * 100.0 / 1e6);
    rows.push(row);

    metrics_rows(tmp.path(), &workload, n, &mut rows)?;

    let mut row = replicate_row(&store, &tmp.path().join("slave"), n)?;
    let sequential = rows[0].rate();
    row.reference = Some(("sequential put (Never)".into(), sequential));
    rows.push(row);
    store.close()?;
    drop(model);
    rows.push(reopen_row(&tmp.path().join("never"), n)?);

    let seconds = Duration::from_secs_f64(args.seconds.max(0.1));
    progress("raw 4 KiB pwrite + fdatasync");
    let raw = raw_fdatasync_rate(tmp.path(), seconds)?;
    let durable = Arc::new(Store::open(
        tmp.path().join("always"),
        Options {
            sync_mode: SyncMode::Always,
            ..Options::default()
        },
    )?);
    let mut next_key = 0u64;
    for &writers in &args.writers {
        let writers = writers.max(1);
        let syncs_before = durable.group_commit_syncs();
        let mut row = durable_puts(&durable, &workload, writers, seconds, &mut next_key);
        let syncs = durable.group_commit_syncs() - syncs_before;
        row.reference = Some(("raw 4 KiB pwrite+fdatasync".into(), raw));
        row.note = format!("{:.1} puts per fsync", row.ops as f64 / syncs.max(1) as f64);
        rows.push(row);
    }
    if let Ok(store) = Arc::try_unwrap(durable) {
        store.close()?;
    }
    if args.backup_mib > 0 {
        backup_rows(tmp.path(), args.backup_mib, &mut rows)?;
    }
    eprintln!();
    print_table(args, &parent, n, index_bytes, &rows);
    if let Some(path) = &args.plot {
        let title = format!(
            "dkv-cask bench: {n} keys of 16 bytes, {}-byte values",
            args.value_size
        );
        super::plot::write_svg(path, &title, &rows)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

/// Copies the first `n` change records of `master` into a new store at
/// `dir` with `load_changes` and `save_changes`, 1000 per batch.
fn replicate_row(master: &Store, dir: &Path, n: u64) -> Result<Row, Box<dyn std::error::Error>> {
    progress("replication (load_changes + save_changes)");
    let slave = Store::open(
        dir,
        Options {
            sync_mode: SyncMode::Never,
            ..Options::default()
        },
    )?;
    let mut latencies = Vec::new();
    let mut from = 0u64;
    let mut copied = 0u64;
    let start = Instant::now();
    while copied < n {
        let t = Instant::now();
        let changes = master.load_changes(from, 1000.min((n - copied) as usize))?;
        let Some(last) = changes.last() else { break };
        from = last.change_number + u64::from(last.number_of_trxns);
        let (_, result) = slave.save_changes(&changes);
        result?;
        copied += changes.len() as u64;
        latencies.push(t.elapsed().as_nanos() as u64 / changes.len() as u64);
    }
    let elapsed = start.elapsed();
    slave.close()?;
    latencies.sort_unstable();
    Ok(Row {
        name: "replication apply, 1000 per batch".into(),
        ops: copied,
        elapsed,
        latencies,
        reference: None,
        note: "per-change latency".into(),
    })
}

/// A row measured in MB/s: `bytes` moved in `elapsed`.
fn throughput_row(name: &str, bytes: u64, elapsed: Duration, note: String) -> Row {
    Row {
        name: name.into(),
        ops: bytes / 1_000_000,
        elapsed,
        latencies: Vec::new(),
        reference: None,
        note,
    }
}

/// Fills a store with `mib` MiB of 4 KiB values, then times a backup beside
/// a plain copy of the same files, and a snapshot export and import beside
/// the disk's raw sequential write rate. These rows' rates are in MB/s.
fn backup_rows(
    tmp: &Path,
    mib: u64,
    rows: &mut Vec<Row>,
) -> Result<(), Box<dyn std::error::Error>> {
    progress(&format!("filling a {mib} MiB store for the backup rows"));
    let options = Options {
        sync_mode: SyncMode::Never,
        ..Options::default()
    };
    let store = Store::open(tmp.join("big"), options.clone())?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let value: Vec<u8> = (0..4096 + 4096).map(|_| rng.next() as u8).collect();
    let pairs = mib * 256;
    for chunk in 0..pairs.div_ceil(64) {
        let batch: Vec<KvPair> = (chunk * 64..((chunk + 1) * 64).min(pairs))
            .map(|i| KvPair {
                key: key(i).to_vec(),
                value: value[(i % 4096) as usize..(i % 4096) as usize + 4096].to_vec(),
                expire_ts: 0,
            })
            .collect();
        store.put(&batch)?;
    }
    store.sync()?;

    progress("backup (hard links)");
    let info = store.backup_to(&tmp.join("backup"))?;
    let bytes = info.bytes();
    progress("copy of the same files");
    let copy_dir = tmp.join("copy");
    std::fs::create_dir(&copy_dir)?;
    let started = Instant::now();
    for f in &info.files {
        std::fs::copy(tmp.join("big").join(&f.name), copy_dir.join(&f.name))?;
        std::fs::File::open(copy_dir.join(&f.name))?.sync_all()?;
    }
    let copy = started.elapsed();
    std::fs::remove_dir_all(&copy_dir)?;
    let mut row = throughput_row(
        "backup, hard links (MB/s)",
        bytes,
        info.duration,
        format!(
            "{} MiB in {:.1} ms",
            bytes >> 20,
            info.duration.as_secs_f64() * 1e3
        ),
    );
    row.reference = Some((
        "copy of the same files".into(),
        bytes as f64 / 1e6 / copy.as_secs_f64(),
    ));
    rows.push(row);

    progress("raw sequential write");
    let raw = raw_sequential_rate(tmp, bytes)?;
    progress("snapshot export");
    let snap = tmp.join("snapshot.bin");
    let started = Instant::now();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&snap)?);
    let stream_bytes = std::io::copy(&mut store.snapshot()?, &mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let mut row = throughput_row(
        "snapshot export (MB/s)",
        stream_bytes,
        started.elapsed(),
        format!("{} MiB stream", stream_bytes >> 20),
    );
    row.reference = Some(("raw sequential write".into(), raw));
    rows.push(row);
    store.close()?;

    progress("snapshot import");
    let target = Store::open(tmp.join("imported"), options)?;
    let started = Instant::now();
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&snap)?);
    target.load_snapshot(&mut input)?;
    target.sync()?;
    let mut row = throughput_row(
        "snapshot import (MB/s)",
        stream_bytes,
        started.elapsed(),
        String::new(),
    );
    row.reference = Some(("raw sequential write".into(), raw));
    rows.push(row);
    target.close()?;
    std::fs::remove_file(&snap)?;
    Ok(())
}

/// The disk's rate of writing `bytes` sequentially in 1 MiB writes, then
/// syncing, in MB/s.
fn raw_sequential_rate(dir: &Path, bytes: u64) -> std::io::Result<f64> {
    let path = dir.join("raw-sequential");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let block = vec![0x5Au8; 1 << 20];
    let started = Instant::now();
    let mut at = 0;
    while at < bytes {
        file.write_all_at(&block, at)?;
        at += block.len() as u64;
    }
    file.sync_all()?;
    let rate = at as f64 / 1e6 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Puts new keys from `writers` threads under `SyncMode::Always` for `time`.
fn durable_puts(
    store: &Arc<Store>,
    workload: &Workload,
    writers: usize,
    time: Duration,
    next_key: &mut u64,
) -> Row {
    let name = format!(
        "put (Always), {writers} writer{}",
        if writers == 1 { "" } else { "s" }
    );
    progress(&name);
    let base = *next_key;
    let start = Instant::now();
    let deadline = start + time;
    let per_thread: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers as u64)
            .map(|t| {
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let k = base + t + i * writers as u64;
                        let p = workload.pair(k);
                        let t0 = Instant::now();
                        store.put(&[p]).expect("durable put");
                        lat.push(t0.elapsed().as_nanos() as u64);
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut latencies: Vec<u64> = per_thread.into_iter().flatten().collect();
    latencies.sort_unstable();
    *next_key += latencies.len() as u64 + writers as u64;
    Row {
        name,
        ops: latencies.len() as u64,
        elapsed,
        latencies,
        reference: None,
        note: String::new(),
    }
}

/// The disk's rate of 4 KiB `pwrite` + `fdatasync` into a preallocated file.
fn raw_fdatasync_rate(dir: &Path, time: Duration) -> std::io::Result<f64> {
    const FILE: u64 = 64 << 20;
    let path = dir.join("raw-fdatasync");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let zeros = vec![0u8; 1 << 20];
    for i in 0..FILE / (1 << 20) {
        file.write_all_at(&zeros, i << 20)?;
    }
    file.sync_all()?;
    let block = vec![0xA5u8; 4096];
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < time {
        file.write_all_at(&block, (ops * 4096) % FILE)?;
        file.sync_data()?;
        ops += 1;
    }
    let rate = ops as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn print_table(args: &BenchArgs, parent: &Path, n: u64, index_bytes: usize, rows: &[Row]) {
    println!(
        "dkv-cask bench: {n} keys of 16 bytes, {}-byte values, stores under {}",
        args.value_size,
        parent.display()
    );
    println!();
    println!("| workload | ops/s | p50 µs | p99 µs | reference | ref ops/s | ratio | note |");
    println!("|---|---:|---:|---:|---|---:|---:|---|");
    for r in rows {
        let (rname, rrate, ratio) = match &r.reference {
            Some((name, rate)) => (
                name.as_str(),
                format!("{rate:.0}"),
                format!("{:.2}", r.rate() / rate),
            ),
            None => ("", String::new(), String::new()),
        };
        let (p50, p99) = if r.latencies.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.1}", r.percentile(0.5)),
                format!("{:.1}", r.percentile(0.99)),
            )
        };
        println!(
            "| {} | {:.0} | {p50} | {p99} | {} | {} | {} | {} |",
            r.name,
            r.rate(),
            rname,
            rrate,
            ratio,
            r.note
        );
    }
    let per_key = index_bytes as f64 / n as f64 - 16.0;
    println!();
    println!(
        "index memory: {index_bytes} bytes for {n} keys = {per_key:.1} bytes per key beyond the 16-byte key"
    );
    let rate_of = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map(Row::rate)
    };
    if let (Some(one), Some(sixteen)) = (
        rate_of("put (Always), 1 writer"),
        rate_of("put (Always), 16 writers"),
    ) {
        println!(
            "group commit: 16 writers reach {:.1}x the 1-writer rate",
            sixteen / one
        );
    }
}
