//! DKV's storage `Stat`, and the store's own gauges, for Prometheus: a
//! request-latency summary with real quantiles over a sliding window, an
//! error counter, and a collector of store figures. Everything registers
//! into a caller-supplied registry (no global state) and is unregistered on
//! close. Must not block the operation it measures for more than an
//! uncontended lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::store::Inner;

/// The `ops` label values DKV defines (`internal/stats/models.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A put of one pair.
    Put,
    /// A put of several pairs.
    MultiPut,
    /// A get of one key.
    Get,
    /// A get of several keys.
    MultiGet,
    /// A delete.
    Delete,
    /// Opening a snapshot stream.
    GetSnapshot,
    /// Loading a snapshot stream.
    PutSnapshot,
    /// Opening an iterator.
    Iterate,
    /// A compare-and-set.
    CompareAndSet,
    /// `load_changes`.
    LoadChanges,
    /// `save_changes`.
    SaveChanges,
}

impl Op {
    const ALL: [Op; 11] = [
        Op::Put,
        Op::MultiPut,
        Op::Get,
        Op::MultiGet,
        Op::Delete,
        Op::GetSnapshot,
        Op::PutSnapshot,
        Op::Iterate,
        Op::CompareAndSet,
        Op::LoadChanges,
        Op::SaveChanges,
    ];

    /// DKV's label value.
    pub fn label(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::MultiPut => "mput",
            Op::Get => "get",
            Op::MultiGet => "mget",
            Op::Delete => "del",
            Op::GetSnapshot => "getSnapShot",
            Op::PutSnapshot => "putSnapShot",
            Op::Iterate => "iter",
            Op::CompareAndSet => "cas",
            Op::LoadChanges => "loadChange",
            Op::SaveChanges => "saveChange",
        }
    }
}

/// Where and how a store reports metrics.
#[derive(Clone, Debug)]
pub struct MetricsOptions {
    /// The registry the store's collectors join. Stores sharing one
    /// registry need different `engine` names.
    pub registry: Registry,
    /// The `<engine>` in `dkv_storage_latency_<engine>`. Default: `cask`.
    pub engine: String,
    /// The window the latency quantiles cover. Default: 10 s (DKV's MaxAge).
    pub window: Duration,
}

impl MetricsOptions {
    /// Metrics into `registry` under the default engine name and window.
    pub fn new(registry: Registry) -> Self {
        MetricsOptions {
            registry,
            engine: "cask".into(),
            window: Duration::from_secs(10),
        }
    }
}

/// The quantiles DKV asks for, with their allowed rank error.
pub const OBJECTIVES: [(f64, f64); 3] = [(0.5, 0.05), (0.9, 0.01), (0.99, 0.001)];

/// Samples kept per one-tenth of the window; beyond it, reservoir sampling
/// keeps a uniform sample (rank error about 1/sqrt(n) at worst).
const BUCKET_SAMPLES: usize = 8192;
/// The window is cut into this many buckets that age out one at a time.
const BUCKETS: u32 = 10;

#[derive(Debug)]
struct Bucket {
    start: Instant,
    samples: Vec<f64>,
}

/// One operation's series. Count, sum and the newest bucket's observation
/// count are atomics, so that most observations take no lock: once the
/// newest bucket holds `BUCKET_SAMPLES` samples, reservoir sampling keeps a
/// new observation only with probability `BUCKET_SAMPLES / seen`, and that
/// draw is made before taking the lock.
#[derive(Debug)]
#[repr(align(128))] // one series per cache-line pair: no false sharing
struct Series {
    count: AtomicU64,
    /// Sum of the latencies, in nanoseconds.
    sum_nanos: AtomicU64,
    /// Observations since the newest bucket started.
    seen: AtomicU64,
    /// When the newest bucket ends, in nanoseconds since the summary's
    /// epoch (0: no bucket yet).
    rotate_at: AtomicU64,
    buckets: Mutex<Vec<Bucket>>,
}

thread_local! {
    /// Each thread's reservoir draws (xorshift).
    static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A uniform draw in `0..n`, from this thread's generator.
fn draw_below(n: u64) -> u64 {
    DRAWS.with(|d| {
        let mut x = d.get();
        if x == 0 {
            // Seeded per thread (each `RandomState` has its own keys).
            use std::hash::{BuildHasher, Hasher};
            x = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.set(x);
        // Multiply-high: no division on the hot path.
        ((u128::from(x) * u128::from(n)) >> 64) as u64
    })
}

/// A summary with quantiles over a sliding window: observations land in
/// the newest of ten buckets, buckets older than the window are dropped,
/// and quantiles are computed from the samples of the live buckets when
/// the registry collects.
#[derive(Debug)]
pub struct WindowedSummary {
    desc: Desc,
    window: Duration,
    epoch: Instant,
    series: Vec<Series>,
}

impl WindowedSummary {
    fn new(name: &str, help: &str, window: Duration) -> prometheus::Result<Self> {
        let desc = Desc::new(name.into(), help.into(), vec!["ops".into()], HashMap::new())?;
        Ok(WindowedSummary {
            desc,
            window,
            epoch: Instant::now(),
            series: Op::ALL
                .iter()
                .map(|_| Series {
                    count: AtomicU64::new(0),
                    sum_nanos: AtomicU64::new(0),
                    seen: AtomicU64::new(0),
                    rotate_at: AtomicU64::new(0),
                    buckets: Mutex::new(Vec::new()),
                })
                .collect(),
        })
    }

    /// Records one latency of `op`, in seconds.
    pub fn observe(&self, op: Op, seconds: f64) {
        self.observe_at(op, seconds, Instant::now());
    }

    /// Records one latency of `op` that ended at `now` (saves a clock read
    /// when the caller has just taken one).
    pub fn observe_at(&self, op: Op, seconds: f64, now: Instant) {
        let s = &self.series[op as usize];
        s.count.fetch_add(1, Ordering::Relaxed);
        s.sum_nanos
            .fetch_add((seconds * 1e9).round() as u64, Ordering::Relaxed);
        let at = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        // The bucket first, then its count: a count read before a rotation
        // would belong to the old bucket.
        let current = at < s.rotate_at.load(Ordering::Acquire);
        let seen = s.seen.fetch_add(1, Ordering::Relaxed) + 1;
        // Reservoir sampling: the `seen`-th observation of a full bucket
        // replaces a random sample with probability BUCKET_SAMPLES / seen.
        let slot = if current && seen > BUCKET_SAMPLES as u64 {
            let j = draw_below(seen);
            if j >= BUCKET_SAMPLES as u64 {
                return;
            }
            Some(j as usize)
        } else {
            None
        };
        let mut buckets = s.buckets.lock();
        if at >= s.rotate_at.load(Ordering::Acquire) {
            let window = self.window;
            buckets.retain(|b| now.saturating_duration_since(b.start) < window);
            buckets.push(Bucket {
                start: now,
                samples: Vec::new(),
            });
            let slice = (self.window / BUCKETS).as_nanos() as u64;
            s.seen.store(1, Ordering::Relaxed);
            s.rotate_at.store(at + slice.max(1), Ordering::Release);
        }
        let b = buckets.last_mut().expect("a bucket was just ensured");
        match slot {
            Some(j) if j < b.samples.len() => b.samples[j] = seconds,
            _ if b.samples.len() < BUCKET_SAMPLES => b.samples.push(seconds),
            _ => {}
        }
    }

    /// The quantiles of `op` over the window (NaN when it saw nothing).
    pub fn quantiles(&self, op: Op) -> Vec<(f64, f64)> {
        let now = Instant::now();
        let buckets = self.series[op as usize].buckets.lock();
        let mut all: Vec<f64> = buckets
            .iter()
            .filter(|b| now.saturating_duration_since(b.start) < self.window)
            .flat_map(|b| b.samples.iter().copied())
            .collect();
        drop(buckets);
        all.sort_by(f64::total_cmp);
        OBJECTIVES
            .iter()
            .map(|&(q, _)| {
                let v = if all.is_empty() {
                    f64::NAN
                } else {
                    all[((all.len() - 1) as f64 * q).round() as usize]
                };
                (q, v)
            })
            .collect()
    }
}

impl Collector for WindowedSummary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut metrics = Vec::new();
        for op in Op::ALL {
            let s = &self.series[op as usize];
            let count = s.count.load(Ordering::Relaxed);
            let sum = s.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let mut summary = proto::Summary::default();
            summary.set_sample_count(count);
            summary.set_sample_sum(sum);
            summary.set_quantile(
                self.quantiles(op)
                    .into_iter()
                    .map(|(q, v)| {
                        let mut quantile = proto::Quantile::default();
                        quantile.set_quantile(q);
                        quantile.set_value(v);
                        quantile
                    })
                    .collect(),
            );
            let mut label = proto::LabelPair::default();
            label.set_name("ops".into());
            label.set_value(op.label().into());
            let mut m = proto::Metric::default();
            m.set_label(vec![label]);
            m.set_summary(summary);
            metrics.push(m);
        }
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(metrics);
        vec![family]
    }
}

/// DKV's `Stat`: request latency and errors per operation.
#[derive(Debug)]
pub struct Stat {
    /// `dkv_storage_latency_<engine>`, a summary in seconds.
    pub request_latency: WindowedSummary,
    /// `dkv_storage_error_<engine>`, a counter.
    pub response_error: IntCounterVec,
    errors: Vec<prometheus::IntCounter>,
}

impl Stat {
    /// The two metrics of DKV's `NewStat(engine)`, not yet registered.
    pub fn new(engine: &str, window: Duration) -> prometheus::Result<Stat> {
        let response_error = IntCounterVec::new(
            Opts::new(
                format!("dkv_storage_error_{engine}"),
                format!("Error count for {engine} storage operations"),
            ),
            &["ops"],
        )?;
        let errors = Op::ALL
            .iter()
            .map(|op| response_error.with_label_values(&[op.label()]))
            .collect();
        Ok(Stat {
            request_latency: WindowedSummary::new(
                &format!("dkv_storage_latency_{engine}"),
                &format!("Latency statistics for {engine} storage operations"),
                window,
            )?,
            response_error,
            errors,
        })
    }

    /// Records one operation that started at `started`: its latency, and
    /// an error if it failed.
    pub fn record(&self, op: Op, started: Instant, failed: bool) {
        let now = Instant::now();
        self.request_latency
            .observe_at(op, now.duration_since(started).as_secs_f64(), now);
        if failed {
            self.errors[op as usize].inc();
        }
    }
}

/// The store's own figures, read when the registry collects.
pub(crate) struct StoreCollector {
    inner: Weak<Inner>,
    descs: Vec<Desc>,
    engine: String,
}

/// The store gauges: name suffix and help.
const GAUGES: [(&str, &str); 17] = [
    ("keys", "Keys in the index"),
    ("segments", "Segment files"),
    (
        "log_bytes",
        "Bytes of headers and records in the segment files",
    ),
    ("live_bytes", "Bytes of the live keys' operations"),
    (
        "dead_bytes",
        "Bytes of overwritten, deleted or framing data (expired keys not counted)",
    ),
    ("written_bytes", "Bytes appended since open"),
    (
        "read_bytes",
        "Bytes of records read by gets, scans, iterators and snapshots since open",
    ),
    ("fsyncs", "fdatasync calls made by group commit since open"),
    (
        "records_per_fsync",
        "Records made durable per group-commit fdatasync",
    ),
    ("committed_change_number", "Latest durable change number"),
    (
        "applied_change_number",
        "Master change number applied (replicas)",
    ),
    (
        "recovery_seconds",
        "Time the last open took to rebuild the index",
    ),
    ("index_bytes", "Heap bytes of the in-memory index"),
    ("merges", "Merges completed since open"),
    (
        "merged_bytes_reclaimed",
        "Segment bytes given back by merges since open",
    ),
    ("merge_failures", "Background merges that failed since open"),
    (
        "segments_from_hints",
        "Segments the last open read from hint files instead of scanning",
    ),
];

impl StoreCollector {
    pub(crate) fn new(inner: Weak<Inner>, engine: &str) -> prometheus::Result<Self> {
        let descs = GAUGES
            .iter()
            .map(|(name, help)| {
                Desc::new(
                    format!("dkv_{engine}_{name}"),
                    (*help).into(),
                    Vec::new(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(StoreCollector {
            inner,
            descs,
            engine: engine.into(),
        })
    }
}

impl Collector for StoreCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let figures = inner.figures();
        GAUGES
            .iter()
            .zip(figures)
            .map(|((name, help), value)| {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                let mut m = proto::Metric::default();
                m.set_gauge(g);
                let mut family = MetricFamily::default();
                family.set_name(format!("dkv_{}_{name}", self.engine));
                family.set_help((*help).into());
                family.set_field_type(MetricType::GAUGE);
                family.set_metric(vec![m]);
                family
            })
            .collect()
    }
}

/// The metrics of one open store, as registered.
pub(crate) struct StoreMetrics {
    stat: Arc<Stat>,
    registry: Registry,
    engine: String,
}

/// Lets the registry hold the summary while the store observes into it.
struct SharedSummary(Arc<Stat>);

impl Collector for SharedSummary {
    fn desc(&self) -> Vec<&Desc> {
        self.0.request_latency.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.request_latency.collect()
    }
}

impl StoreMetrics {
    /// Builds the store's metrics and registers them; nothing stays
    /// registered if a registration fails.
    pub(crate) fn register(
        options: &MetricsOptions,
        inner: Weak<Inner>,
    ) -> prometheus::Result<Self> {
        let stat = Arc::new(Stat::new(&options.engine, options.window)?);
        let metrics = StoreMetrics {
            stat: Arc::clone(&stat),
            registry: options.registry.clone(),
            engine: options.engine.clone(),
        };
        let collectors: [Box<dyn Collector>; 3] = [
            Box::new(SharedSummary(Arc::clone(&stat))),
            Box::new(stat.response_error.clone()),
            Box::new(StoreCollector::new(inner, &options.engine)?),
        ];
        for (registered, c) in collectors.into_iter().enumerate() {
            if let Err(e) = options.registry.register(c) {
                // Undo only what this call registered: the names that
                // clashed belong to someone else.
                metrics.unregister_first(registered);
                return Err(e);
            }
        }
        Ok(metrics)
    }

    /// The `Stat` the store observes into.
    pub(crate) fn stat(&self) -> Arc<Stat> {
        Arc::clone(&self.stat)
    }

    /// Removes the store's collectors from the registry (matched by their
    /// descriptions).
    pub(crate) fn unregister(&self) {
        self.unregister_first(3);
    }

    fn unregister_first(&self, n: usize) {
        if n > 0 {
            let _ = self
                .registry
                .unregister(Box::new(SharedSummary(Arc::clone(&self.stat))));
        }
        if n > 1 {
            let _ = self
                .registry
                .unregister(Box::new(self.stat.response_error.clone()));
        }
        if n > 2
            && let Ok(c) = StoreCollector::new(Weak::new(), &self.engine)
        {
            let _ = self.registry.unregister(Box::new(c));
        }
    }
}

impl Inner {
    /// The gauge values, in the order of [`GAUGES`].
    fn figures(&self) -> Vec<f64> {
        let written = self.commit.written();
        let (keys, segments, log_bytes, index_bytes, merges) = {
            let state = self.state.read();
            let log: u64 = state
                .usage
                .iter()
                .map(|(id, u)| match state.segments.get(id).map(|r| &**r) {
                    // The active segment: as far as written.
                    Some(crate::store::SegmentReader::Active(..)) => {
                        crate::format::SEGMENT_HEADER_LEN as u64 + written.saturating_sub(u.base)
                    }
                    _ => u.bytes,
                })
                .sum();
            (
                state.keydir.len() as f64,
                state.segments.len() as f64,
                log,
                state.keydir.memory_bytes() as f64,
                state.merges,
            )
        };
        let live = self.state.read().live_bytes;
        let fsyncs = self.commit.syncs();
        let records = self.records_written.load(Ordering::Relaxed);
        vec![
            keys,
            segments,
            log_bytes as f64,
            live as f64,
            log_bytes.saturating_sub(live) as f64,
            self.commit.written().saturating_sub(self.opened_at) as f64,
            self.read_bytes.load(Ordering::Relaxed) as f64,
            fsyncs as f64,
            if fsyncs == 0 {
                0.0
            } else {
                records as f64 / fsyncs as f64
            },
            self.commit.durable() as f64,
            self.applied.load(Ordering::Relaxed) as f64,
            self.report.duration.as_secs_f64(),
            index_bytes,
            merges.0 as f64,
            merges.1 as f64,
            self.merge_failures.load(Ordering::Relaxed) as f64,
            self.report.segments_from_hints as f64,
        ]
    }
}
