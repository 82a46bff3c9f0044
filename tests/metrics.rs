//! DKV's storage `Stat` and the store's gauges in Prometheus: names, labels
//! and types as DKV's, real quantiles over a sliding window, errors
//! counted, collectors registered into the caller's registry and removed on
//! close.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dkv_cask::{
    Error, FaultInjector, InjectedError, KvStore, MetricsOptions, OBJECTIVES, Op, Options, Stat,
    Store, SyncMode,
};
use prometheus::{Encoder, Registry, TextEncoder};

fn exposition(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn with_metrics(registry: &Registry) -> Options {
    Options {
        metrics: Some(MetricsOptions::new(registry.clone())),
        ..test_options()
    }
}

/// The value of the sample line `name{labels}` in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn quantiles_of_a_known_distribution_are_within_the_objectives() {
    let stat = Stat::new("test", Duration::from_secs(10)).unwrap();
    // 0.0001 s .. 0.8 s, shuffled.
    let n = 8000u64;
    let mut order: Vec<u64> = (1..=n).collect();
    let mut rng = Rng::new(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for &i in &order {
        stat.request_latency.observe(Op::Get, i as f64 / 10_000.0);
    }
    for (q, v) in stat.request_latency.quantiles(Op::Get) {
        let (_, err) = OBJECTIVES.iter().find(|(o, _)| *o == q).copied().unwrap();
        let rank = v * 10_000.0 / n as f64;
        assert!(
            (rank - q).abs() <= err,
            "quantile {q}: value {v} is rank {rank}"
        );
    }
    // A larger stream is sampled (a uniform reservoir of 8,192 per tenth
    // of the window, drawn at random): each quantile lies within 4.5
    // standard errors, sqrt(q(1-q)/8192), of the true one. A fixed bound
    // of 0.01 failed about one run in fifteen at the median (1.8 errors).
    let big = Stat::new("big", Duration::from_secs(10)).unwrap();
    for i in 0..100_000u64 {
        big.request_latency
            .observe(Op::Put, ((i * 7919) % 100_000) as f64 / 100_000.0);
    }
    for (q, v) in big.request_latency.quantiles(Op::Put) {
        let bound = 4.5 * (q * (1.0 - q) / 8192.0).sqrt();
        assert!(
            (v - q).abs() <= bound,
            "sampled quantile {q}: {v}, more than {bound} off"
        );
    }
}

#[test]
fn samples_older_than_the_window_drop_out_of_the_quantiles() {
    let stat = Stat::new("window", Duration::from_millis(200)).unwrap();
    stat.request_latency.observe(Op::Get, 0.5);
    assert_eq!(stat.request_latency.quantiles(Op::Get)[0].1, 0.5);
    std::thread::sleep(Duration::from_millis(250));
    stat.request_latency.observe(Op::Get, 0.1);
    assert!(
        stat.request_latency
            .quantiles(Op::Get)
            .iter()
            .all(|&(_, v)| v == 0.1)
    );
    std::thread::sleep(Duration::from_millis(250));
    assert!(
        stat.request_latency
            .quantiles(Op::Get)
            .iter()
            .all(|(_, v)| v.is_nan())
    );
}

#[test]
fn the_exposition_has_dkvs_names_labels_and_types() {
    let registry = Registry::new();
    let t = temp_store(with_metrics(&registry));
    t.store.put(&[pair("a", "1")]).unwrap();
    t.store.put(&[pair("b", "2"), pair("c", "3")]).unwrap();
    value_of(&t.store, "a");
    t.store.get(&[b"a", b"b"]).unwrap();
    t.store.delete(b"a").unwrap();
    let text = exposition(&registry);
    assert!(
        text.contains("# TYPE dkv_storage_latency_cask summary"),
        "{text}"
    );
    assert!(text.contains(
        "# HELP dkv_storage_latency_cask Latency statistics for cask storage operations"
    ));
    for op in [
        "put",
        "mput",
        "get",
        "mget",
        "del",
        "getSnapShot",
        "putSnapShot",
        "iter",
        "cas",
        "loadChange",
        "saveChange",
    ] {
        for q in ["0.5", "0.9", "0.99"] {
            assert!(
                text.contains(&format!(
                    "dkv_storage_latency_cask{{ops=\"{op}\",quantile=\"{q}\"}}"
                )),
                "{op} {q}"
            );
        }
    }
    assert_eq!(
        sample(&text, "dkv_storage_latency_cask_count{ops=\"put\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "dkv_storage_latency_cask_count{ops=\"mput\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "dkv_storage_latency_cask_count{ops=\"mget\"}"),
        Some(1.0)
    );
    let put_p50 = sample(
        &text,
        "dkv_storage_latency_cask{ops=\"put\",quantile=\"0.5\"}",
    )
    .unwrap();
    assert!(
        put_p50 > 0.0 && put_p50 < 1.0,
        "latencies are in seconds: {put_p50}"
    );
    assert!(text.contains("# TYPE dkv_storage_error_cask counter"));
    assert!(text.contains("# TYPE dkv_cask_keys gauge"));
    assert_eq!(sample(&text, "dkv_cask_keys"), Some(2.0));
    assert_eq!(
        sample(&text, "dkv_cask_committed_change_number"),
        Some(t.store.durable_change_number() as f64)
    );
}

#[test]
fn failing_operations_count_as_errors_by_operation() {
    let registry = Registry::new();
    let faults = Arc::new(FaultInjector::new());
    let t = temp_store(Options {
        sync_mode: SyncMode::Always,
        fault_injector: Some(Arc::clone(&faults)),
        ..with_metrics(&registry)
    });
    let errors = |op: &str| {
        sample(
            &exposition(&registry),
            &format!("dkv_storage_error_cask{{ops=\"{op}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(matches!(
        t.store.put(&[pair("", "x")]),
        Err(Error::EmptyKey)
    ));
    assert_eq!(errors("put"), 1.0);
    assert!(t.store.delete(b"").is_err());
    assert_eq!(errors("del"), 1.0);
    faults.fail_after(0, InjectedError::Eio);
    assert!(t.store.put(&[pair("k", "v")]).is_err());
    assert!(matches!(
        t.store.put(&[pair("k", "v")]),
        Err(Error::Poisoned { .. })
    ));
    assert_eq!(errors("put"), 3.0);
    assert!(t.store.get(&[b"k"]).is_ok(), "reads keep working");
    assert_eq!(errors("get"), 0.0);
}

#[test]
fn collectors_join_the_callers_registry_and_leave_it_on_close() {
    let registry = Registry::new();
    let first = temp_store(with_metrics(&registry));
    // A second store in the same registry needs another engine name.
    let clash = Store::open(tempfile::tempdir().unwrap().path(), with_metrics(&registry));
    assert!(matches!(clash, Err(Error::InvalidOptions(_))), "{clash:?}");
    let other = temp_store(Options {
        metrics: Some(MetricsOptions {
            engine: "cask2".into(),
            ..MetricsOptions::new(registry.clone())
        }),
        ..test_options()
    });
    let text = exposition(&registry);
    assert!(
        text.contains("dkv_storage_latency_cask{") && text.contains("dkv_storage_latency_cask2{")
    );
    first.store.close().unwrap();
    other.store.close().unwrap();
    assert!(registry.gather().is_empty(), "{}", exposition(&registry));
    // After close the name is free again.
    let again = Store::open(first.dir.path(), with_metrics(&registry)).unwrap();
    assert!(!registry.gather().is_empty());
    drop(again);
    assert!(registry.gather().is_empty());
}

#[test]
fn store_gauges_follow_merges_live_and_dead_bytes() {
    let registry = Registry::new();
    let t = temp_store(Options {
        segment_size: 16 << 10,
        retention: dkv_cask::Retention::none(),
        merge: dkv_cask::MergeOptions {
            automatic: false,
            ..dkv_cask::MergeOptions::default()
        },
        ..with_metrics(&registry)
    });
    for round in 0..3 {
        for i in 0..200 {
            t.store
                .put(&[pair(
                    format!("key-{i:04}"),
                    format!("{round}-{}", "v".repeat(60)),
                )])
                .unwrap();
        }
    }
    let before = exposition(&registry);
    assert_eq!(sample(&before, "dkv_cask_merges"), Some(0.0));
    let stats = t.store.stats().unwrap();
    assert_eq!(
        sample(&before, "dkv_cask_live_bytes"),
        Some(stats.live_bytes as f64)
    );
    assert_eq!(
        sample(&before, "dkv_cask_log_bytes"),
        Some(stats.disk_bytes() as f64)
    );
    let report = t.store.merge().unwrap();
    let after = exposition(&registry);
    assert_eq!(sample(&after, "dkv_cask_merges"), Some(report.runs as f64));
    assert_eq!(
        sample(&after, "dkv_cask_merged_bytes_reclaimed"),
        Some((report.bytes_before - report.bytes_after) as f64)
    );
    assert!(
        sample(&after, "dkv_cask_dead_bytes").unwrap()
            < sample(&before, "dkv_cask_dead_bytes").unwrap() / 2.0
    );
}

#[test]
fn read_bytes_counts_the_records_whose_pairs_reads_hand_out() {
    let registry = Registry::new();
    let t = temp_store(with_metrics(&registry));
    // 300 pairs of one size (so their records have one length, and a scan
    // of them spans several chunks), and one pair already expired.
    for i in 0..300 {
        t.store
            .put(&[pair(format!("k{i:03}"), "value-of-ten")])
            .unwrap();
    }
    t.store.put(&[pair_ttl("k999", "value-of-ten", 1)]).unwrap();
    let read = || sample(&exposition(&registry), "dkv_cask_read_bytes").unwrap();
    assert_eq!(read(), 0.0, "nothing read yet");

    assert_eq!(t.store.get(&[b"k001"]).unwrap().len(), 1);
    let one = read();
    assert!(
        one >= 16.0,
        "a record holds at least its key and value: {one}"
    );
    t.store.get(&[b"missing", b"k999"]).unwrap();
    assert_eq!(read(), one, "missing and expired keys read nothing");

    let mut seen = 0;
    t.store
        .scan(&dkv_cask::IterationOptions::new(), |_| {
            seen += 1;
            true
        })
        .unwrap();
    assert_eq!(seen, 300);
    assert_eq!(
        read(),
        301.0 * one,
        "a scan counts every record it hands out"
    );

    let pairs: Vec<_> = t
        .store
        .iter(&dkv_cask::IterationOptions::new().with_prefix(b"k00".to_vec()))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(pairs.len(), 10);
    assert_eq!(read(), 311.0 * one, "an iterator's reads count too");

    let mut stream = Vec::new();
    std::io::Read::read_to_end(&mut t.store.get_snapshot().unwrap(), &mut stream).unwrap();
    assert_eq!(read(), 611.0 * one, "a snapshot reads every live record");
}
