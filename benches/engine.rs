//! Criterion benchmarks of the engine's hot paths: put without fsync, random
//! get, missing-key get, a 100-key prefix scan, and a durable put. Run with
//! `cargo bench`; `cargo test` runs each once in test mode. The CLI's
//! `dkv-cask bench` measures the same paths at 1M keys, with references.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{IterationOptions, KvStore, Options, Store, SyncMode};

const KEYS: u64 = 100_000;

fn key(i: u64) -> Vec<u8> {
    format!("{i:016}").into_bytes()
}

fn pair(i: u64) -> KvPair {
    KvPair {
        key: key(i),
        value: vec![(i % 251) as u8; 100],
        expire_ts: 0,
    }
}

/// Options of the benchmark stores: 8 MiB segments, the given sync mode.
fn options(sync_mode: SyncMode) -> Options {
    Options {
        sync_mode,
        segment_size: 8 << 20,
        ..Options::default()
    }
}

/// A store opened with `options` and filled with `KEYS` pairs.
fn filled_store(options: Options) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options).unwrap();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<KvPair> = chunk.iter().map(|&i| pair(i)).collect();
        store.put(&batch).unwrap();
    }
    (dir, store)
}

fn engine(c: &mut Criterion) {
    let (_dir, store) = filled_store(options(SyncMode::Never));
    let mut i = 0u64;
    c.bench_function("put 100 B (SyncMode::Never)", |b| {
        b.iter_batched(
            || {
                i += 1;
                pair(KEYS + i)
            },
            |p| store.put(std::slice::from_ref(&p)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let mut r = 0x9E37_79B9u64;
    c.bench_function("random get", |b| {
        b.iter(|| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            let k = key(r % KEYS);
            black_box(store.get(&[&k]).unwrap())
        })
    });
    c.bench_function("missing-key get", |b| {
        let k = key(KEYS * 10);
        b.iter(|| black_box(store.get(&[&k]).unwrap()))
    });
    c.bench_function("100-key prefix scan", |b| {
        let mut g = 0u64;
        b.iter(|| {
            g = (g + 7) % (KEYS / 100);
            let k = key(g * 100);
            let options = IterationOptions::new().with_prefix(&k[..14]);
            black_box(store.iter(&options).unwrap().count())
        })
    });
}

fn durable(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), options(SyncMode::Always)).unwrap();
    let mut group = c.benchmark_group("durable");
    group.sample_size(20);
    let mut i = 0u64;
    group.bench_function("put 100 B (SyncMode::Always, 1 writer)", |b| {
        b.iter(|| {
            i += 1;
            store.put(&[pair(i)]).unwrap()
        })
    });
    group.finish();
}

/// The cost of metrics: the same get and put on two equal stores, one with
/// DKV's `Stat` and the store collector registered, one without.
fn metrics_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");
    for with_metrics in [false, true] {
        let registry = prometheus::Registry::new();
        let (_dir, store) = filled_store(Options {
            metrics: with_metrics.then(|| dkv_cask::MetricsOptions::new(registry.clone())),
            ..options(SyncMode::Never)
        });
        let label = if with_metrics { "on" } else { "off" };
        let mut r = 0x2545_F491u64;
        group.bench_function(format!("random get, metrics {label}"), |b| {
            b.iter(|| {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                let k = key(r % KEYS);
                black_box(store.get(&[&k]).unwrap())
            })
        });
        let mut i = 0u64;
        group.bench_function(
            format!("put 100 B (SyncMode::Never), metrics {label}"),
            |b| {
                b.iter_batched(
                    || {
                        i += 1;
                        pair(KEYS + i)
                    },
                    |p| store.put(std::slice::from_ref(&p)).unwrap(),
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(benches, engine, durable, metrics_cost);
criterion_main!(benches);
