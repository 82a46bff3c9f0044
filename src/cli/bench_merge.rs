//! `dkv-cask bench --suite merge`: what merge and hint files buy, each
//! figure beside its reference from the same run: open time from hints
//! beside open time by scanning, space after rewriting every key three
//! times before and after a merge, put latency while a merge runs beside
//! put latency without one, and a large store opened from hints.

use std::path::Path;
use std::time::{Duration, Instant};

use dkv_cask::serverpb::KvPair;
use dkv_cask::{KvStore, MergeOptions, Options, Retention, Store, SyncMode};

use super::bench::{Rng, key, progress};

/// Options of the suite's stores: no syncs for the fills, nothing kept for
/// followers, merges only when asked.
fn options() -> Options {
    Options {
        sync_mode: SyncMode::Never,
        retention: Retention::none(),
        merge: MergeOptions {
            automatic: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    }
}

/// One line of the suite's table.
struct Line {
    measure: String,
    value: String,
    reference: String,
    ratio: String,
    note: String,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Writes keys `0..n` (16-byte keys, `value_size`-byte random values)
/// `rounds` times, each round in a new random order, 64 pairs per batch.
fn fill(store: &Store, n: u64, value_size: usize, rounds: u32) -> dkv_cask::Result<()> {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let values: Vec<u8> = (0..4096 + value_size).map(|_| rng.next() as u8).collect();
    for round in 0..rounds {
        progress(&format!("fill {n} keys, round {} of {rounds}", round + 1));
        let order = rng.permutation(n);
        for chunk in order.chunks(64) {
            let batch: Vec<KvPair> = chunk
                .iter()
                .map(|&i| {
                    let at = (u64::from(i).wrapping_mul(2_654_435_761) + u64::from(round)) % 4096;
                    KvPair {
                        key: key(u64::from(i)).to_vec(),
                        value: values[at as usize..at as usize + value_size].to_vec(),
                        expire_ts: 0,
                    }
                })
                .collect();
            store.put(&batch)?;
        }
    }
    store.sync()
}

/// Opens the store at `dir`, answers one get, and closes it; returns the
/// time to the first answer and the recovery report.
fn open_and_get(dir: &Path) -> dkv_cask::Result<(Duration, dkv_cask::RecoveryReport)> {
    let started = Instant::now();
    let store = Store::open(dir, options())?;
    let found = store.get(&[&key(1)[..]])?;
    let elapsed = started.elapsed();
    assert_eq!(found.len(), 1, "key 1 is in the store");
    let report = store.recovery_report().clone();
    store.close()?;
    Ok((elapsed, report))
}

/// Removes the store's open-time caches from `dir`: the keydir file, and
/// with `hints` every hint file too.
fn remove_caches(dir: &Path, hints: bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let keydir = path.file_name().is_some_and(|n| n == dkv_cask::KEYDIR_FILE);
        if keydir || (hints && path.extension().is_some_and(|e| e == "hint")) {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Resident and peak memory of this process, in bytes (Linux).
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib << 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs the suite and prints its table.
pub fn run(
    parent: &Path,
    keys: u64,
    value_size: usize,
    big_keys: u64,
    merge_rate: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::Builder::new()
        .prefix("dkv-cask-bench-merge-")
        .tempdir_in(parent)?;
    let mut lines = Vec::new();
    let dir = tmp.path().join("rewritten");
    let store = Store::open(&dir, options())?;
    fill(&store, keys, value_size, 3)?;
    let before = store.stats()?;
    store.close()?;

    // Open time: from the keydir file a clean close saves, from hints
    // (keydir file removed), and by scanning (hints removed too).
    let mut medians = Vec::new();
    let mut report = None;
    for (label, remove) in [
        ("reopen from the keydir file", None),
        ("reopen from hints", Some(false)),
        ("reopen by scanning", Some(true)),
    ] {
        progress(label);
        let mut times = Vec::new();
        for _ in 0..3 {
            if let Some(hints) = remove {
                remove_caches(&dir, hints)?;
            }
            let (t, r) = open_and_get(&dir)?;
            times.push(t);
            report.get_or_insert(r);
        }
        medians.push(median(times));
    }
    let (indexed, hinted, scanned) = (medians[0], medians[1], medians[2]);
    let report = report.unwrap_or_default();
    lines.push(Line {
        measure: format!("open + first get, {keys} keys x 3 writes, from the keydir file"),
        value: ms(indexed),
        reference: format!("from hints: {}", ms(hinted)),
        ratio: format!(
            "{:.1}x faster",
            hinted.as_secs_f64() / indexed.as_secs_f64()
        ),
        note: format!("keydir file used: {}; median of 3", report.from_keydir_file),
    });
    lines.push(Line {
        measure: format!("open + first get, {keys} keys x 3 writes, from hints"),
        value: ms(hinted),
        reference: format!("by scanning: {}", ms(scanned)),
        ratio: format!(
            "{:.1}x faster",
            scanned.as_secs_f64() / hinted.as_secs_f64()
        ),
        note: "keydir file removed before each open; median of 3".into(),
    });

    // Space: before and after one merge.
    progress("merge");
    let store = Store::open(&dir, options())?;
    let started = Instant::now();
    let merged = store.merge()?;
    let merge_time = started.elapsed();
    let after = store.stats()?;
    lines.push(Line {
        measure: "space after 3 writes of every key, before merge".into(),
        value: format!("{:.0} MiB", before.disk_bytes() as f64 / 1048576.0),
        reference: format!(
            "key + value data: {:.0} MiB",
            before.data_bytes as f64 / 1048576.0
        ),
        ratio: format!("{:.2}x", before.space_amplification()),
        note: String::new(),
    });
    lines.push(Line {
        measure: "space after merge".into(),
        value: format!("{:.0} MiB", after.disk_bytes() as f64 / 1048576.0),
        reference: format!(
            "key + value data: {:.0} MiB",
            after.data_bytes as f64 / 1048576.0
        ),
        ratio: format!("{:.2}x", after.space_amplification()),
        note: format!(
            "{:.2}x the live operations' bytes; merge took {:.1} s ({:.0} MB/s read)",
            after.disk_bytes() as f64 / after.live_bytes.max(1) as f64,
            merge_time.as_secs_f64(),
            merged.bytes_before as f64 / 1e6 / merge_time.as_secs_f64()
        ),
    });
    store.close()?;

    // Put latency while a merge runs, beside none.
    lines.extend(latency_during_merge(
        tmp.path(),
        keys,
        value_size,
        merge_rate,
    )?);

    // A large store opened from hints.
    if big_keys > 0 {
        let dir = tmp.path().join("big");
        let store = Store::open(&dir, options())?;
        fill(&store, big_keys, value_size, 1)?;
        store.close()?;
        progress(&format!("reopen {big_keys} keys from hints"));
        let mut times = Vec::new();
        let mut index = 0;
        let mut rss = 0;
        for _ in 0..3 {
            let started = Instant::now();
            let store = Store::open(&dir, options())?;
            let found = store.get(&[&key(1)[..]])?;
            times.push(started.elapsed());
            assert_eq!(found.len(), 1);
            index = store.index_memory_bytes();
            rss = memory().0;
            store.close()?;
        }
        let peak = memory().1;
        lines.push(Line {
            measure: format!("open + first get, {big_keys} keys, from hints"),
            value: ms(median(times)),
            reference: "aim: under 2 s".into(),
            ratio: String::new(),
            note: format!(
                "index {:.1} bytes per key beyond the key; RSS with the store open {:.0} MiB, process peak {:.0} MiB",
                index as f64 / big_keys as f64 - 16.0,
                rss as f64 / 1048576.0,
                peak as f64 / 1048576.0
            ),
        });
    }
    eprintln!();
    println!(
        "dkv-cask bench --suite merge: 16-byte keys, {value_size}-byte values, stores under {}",
        parent.display()
    );
    println!();
    println!("| measure | value | reference | ratio | note |");
    println!("|---|---:|---|---:|---|");
    for l in lines {
        println!(
            "| {} | {} | {} | {} | {} |",
            l.measure, l.value, l.reference, l.ratio, l.note
        );
    }
    Ok(())
}

/// p50 and p99 of durable puts from one writer (`SyncMode::Always`) while
/// merges run, beside those while none runs, in the same run: merges of
/// two segments at a time alternate with quiet spells of the same length,
/// and each put is counted by whether a merge overlapped it.
fn latency_during_merge(
    tmp: &Path,
    keys: u64,
    value_size: usize,
    merge_rate: u64,
) -> Result<Vec<Line>, Box<dyn std::error::Error>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tmp.join("busy");
    let mut opts = options();
    opts.sync_mode = SyncMode::Always;
    opts.segment_size = 16 << 20;
    opts.merge.bytes_per_second = merge_rate;
    let store = Store::open(&dir, opts)?;
    // Garbage for the merges: a quarter of the keys, written 3 times.
    fill(&store, keys / 4, value_size, 3)?;
    let sealed: Vec<_> = store
        .stats()?
        .segments
        .iter()
        .filter(|s| !s.active)
        .map(|s| s.id)
        .collect();
    let value = vec![0xA5u8; value_size];
    let stop = AtomicBool::new(false);
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let mut merged_bytes = 0u64;
    let puts: Vec<(Instant, Duration)> = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut puts = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut k = key(i).to_vec();
                k[0] = b'n';
                let t = Instant::now();
                store
                    .put(&[KvPair {
                        key: k,
                        value: value.clone(),
                        expire_ts: 0,
                    }])
                    .expect("durable put");
                puts.push((t, t.elapsed()));
                i += 1;
            }
            puts
        });
        let mut quiet = Duration::from_millis(300);
        for pair in sealed.chunks(2) {
            progress(&format!(
                "durable puts, merges of 2 segments ({} of {})",
                windows.len() + 1,
                sealed.len().div_ceil(2)
            ));
            std::thread::sleep(quiet);
            let started = Instant::now();
            if let Ok(r) = store.merge_segments(pair, &mut |_| true) {
                merged_bytes += r.bytes_before;
            }
            let ended = Instant::now();
            windows.push((started, ended));
            // As long a quiet spell as the merge took.
            quiet = (ended - started).max(Duration::from_millis(100));
        }
        std::thread::sleep(quiet);
        stop.store(true, Ordering::Release);
        writer.join().expect("writer thread")
    });
    store.close()?;
    let (mut busy, mut calm): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for (t, d) in puts {
        let end = t + d;
        if windows.iter().any(|&(a, b)| t < b && end > a) {
            busy.push(d);
        } else {
            calm.push(d);
        }
    }
    busy.sort();
    calm.sort();
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let limit = if merge_rate == 0 {
        "no rate limit".to_string()
    } else {
        format!("limited to {} MB/s", merge_rate / 1_000_000)
    };
    let ratio = |p: f64| pct(&busy, p).as_secs_f64() / pct(&calm, p).as_secs_f64().max(1e-9);
    Ok(vec![
        Line {
            measure: "durable put p99 while merges run".into(),
            value: us(pct(&busy, 0.99)),
            reference: format!("no merge: {}", us(pct(&calm, 0.99))),
            ratio: format!("{:.2}x", ratio(0.99)),
            note: format!(
                "{} puts during {} merges of {:.0} MiB in all ({limit}), {} puts between them",
                busy.len(),
                windows.len(),
                merged_bytes as f64 / 1048576.0,
                calm.len()
            ),
        },
        Line {
            measure: "durable put p50 while merges run".into(),
            value: us(pct(&busy, 0.5)),
            reference: format!("no merge: {}", us(pct(&calm, 0.5))),
            ratio: format!("{:.2}x", ratio(0.5)),
            note: String::new(),
        },
    ])
}
