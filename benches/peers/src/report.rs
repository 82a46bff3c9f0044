//! The markdown report: one row per workload, one column per engine
//! (median [min–max] over the repetitions), the ratio of dkv-cask to the
//! best peer, and issue 8's target for the row.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Args, Metric, Results};

const CASK: &str = "dkv-cask";

/// What a row's target compares.
#[derive(Clone, Copy)]
enum Target {
    /// dkv-cask / best peer, higher is better, at least this much.
    PeerAtLeast(f64),
    /// dkv-cask's own figure, at most this much.
    AtMost(f64),
    /// dkv-cask / the disk's raw sequential write rate, at least this much.
    DiskAtLeast(f64),
    None,
}

struct RowDef {
    metric: Metric,
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    target: Target,
}

fn rows(args: &Args) -> Vec<RowDef> {
    let k = si(args.keys as f64);
    let bk = si(args.big_keys as f64);
    let s = args.seconds;
    let turn = crate::SYNC_SLICE.as_millis();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        RowDef {
            metric: Metric::SeqFill,
            name: leak(format!("sequential fill, {k} single puts, none")),
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.5),
        },
        RowDef {
            metric: Metric::RandFill,
            name: leak(format!("random fill, {k} single puts, none")),
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.5),
        },
        RowDef {
            metric: Metric::Sync1,
            name: leak(format!("sync puts, 1 writer, {s} s in {turn} ms turns")),
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.0),
        },
        RowDef {
            metric: Metric::Sync4,
            name: leak(format!("sync puts, 4 writers, {s} s in {turn} ms turns")),
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(2.0),
        },
        RowDef {
            metric: Metric::DiskSync,
            name: "reference: the disk's raw 4 KiB pwrite + fdatasync, 1 thread, taking its turns in the 1-writer row",
            unit: "ops/s",
            higher_is_better: true,
            target: Target::None,
        },
        RowDef {
            metric: Metric::Get1,
            name: "random hot gets, 1 thread",
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.5),
        },
        RowDef {
            metric: Metric::Get2,
            name: "random hot gets, 2 threads",
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.5),
        },
        RowDef {
            metric: Metric::Missing,
            name: "gets of missing keys, 1 thread",
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.0),
        },
        RowDef {
            metric: Metric::Scan,
            name: "100-key prefix scans",
            unit: "keys/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(1.0),
        },
        RowDef {
            metric: Metric::SpaceBefore,
            name: "files on disk after 3 writes of every key, before compaction",
            unit: "× live",
            higher_is_better: false,
            target: Target::None,
        },
        RowDef {
            metric: Metric::SpaceAfter,
            name: "files on disk after compaction",
            unit: "× live",
            higher_is_better: false,
            target: Target::AtMost(1.25),
        },
        RowDef {
            metric: Metric::SpaceClosed,
            name: "files on disk after compaction and close",
            unit: "× live",
            higher_is_better: false,
            target: Target::None,
        },
        RowDef {
            metric: Metric::ReportedBefore,
            name: "dkv-cask `stats().disk_bytes()`, before merge",
            unit: "× live",
            higher_is_better: false,
            target: Target::None,
        },
        RowDef {
            metric: Metric::ReportedAfter,
            name: "dkv-cask `stats().disk_bytes()`, after merge",
            unit: "× live",
            higher_is_better: false,
            target: Target::AtMost(1.25),
        },
        RowDef {
            metric: Metric::CompactSeconds,
            name: "compaction time (explicit call)",
            unit: "s",
            higher_is_better: false,
            target: Target::None,
        },
        RowDef {
            metric: Metric::Reopen,
            name: leak(format!("reopen of a {k}-key store to the first get")),
            unit: "ms",
            higher_is_better: false,
            target: Target::AtMost(100.0),
        },
        RowDef {
            metric: Metric::BigFill,
            name: leak(format!(
                "4 KiB values: sequential fill of {bk}, synced at the end"
            )),
            unit: "MB/s",
            higher_is_better: true,
            target: Target::DiskAtLeast(0.8),
        },
        RowDef {
            metric: Metric::DiskWrite,
            name: "reference: the disk's raw sequential write (1 MiB writes, then fsync), just before dkv-cask's 4 KiB fill",
            unit: "MB/s",
            higher_is_better: true,
            target: Target::None,
        },
        RowDef {
            metric: Metric::BigGet,
            name: leak(format!("4 KiB values: random gets of {bk}, 1 thread")),
            unit: "ops/s",
            higher_is_better: true,
            target: Target::PeerAtLeast(2.0),
        },
    ]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// 3 significant figures with k / M suffixes.
fn si(x: f64) -> String {
    let (v, suffix) = if x.abs() >= 1e6 {
        (x / 1e6, "M")
    } else if x.abs() >= 1e4 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

fn fixed(x: f64) -> String {
    format!("{x:.2}")
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return "—".into();
    }
    if v.len() == 1 {
        return si(v[0]);
    }
    format!("{} [{}–{}]", si(median(v)), si(min(v)), si(max(v)))
}

/// UTC date and time from the system clock (no dependency).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Versions of the engine crates, from this crate's lock file.
fn versions() -> String {
    let lock = include_str!("../Cargo.lock");
    let mut out = Vec::new();
    let names: &[&str] = if cfg!(feature = "rocksdb") {
        &["redb", "fjall", "lsm-tree", "sled", "rocksdb"]
    } else {
        &["redb", "fjall", "lsm-tree", "sled"]
    };
    for &name in names {
        let needle = format!("name = \"{name}\"\nversion = \"");
        if let Some(at) = lock.find(&needle) {
            let rest = &lock[at + needle.len()..];
            let v = &rest[..rest.find('"').unwrap_or(0)];
            out.push(format!("{name} {v}"));
        }
    }
    out.join(", ")
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib:.0} GiB memory, Linux {}; load average at the end: {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The whole report as markdown.
pub fn render(args: &Args, parent: &Path, results: &Results, took: Duration) -> String {
    let peers: Vec<&String> = args.engines.iter().filter(|e| *e != CASK).collect();
    let mut s = String::new();
    let _ = writeln!(s, "## dkv-cask beside its peers");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{} keys of {} bytes, {}-byte incompressible values ({} keys of 4 KiB for the 4 KiB rows); \
         {} repetitions, interleaved (each runs every engine, in a rotated order; the sync rows take {} ms turns in random orders); \
         stores under `{}`; {:.0} s in all; {}.",
        args.keys,
        crate::KEY,
        crate::VALUE,
        args.big_keys,
        args.reps,
        crate::SYNC_SLICE.as_millis(),
        parent.display(),
        took.as_secs_f64(),
        utc_now()
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "Machine: {}.", machine());
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Engines: dkv-cask (built from {}), {}.",
        env!("CASK_REVISION"),
        versions()
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Each cell: median [min–max] over the repetitions. \"dkv-cask / best peer\": dkv-cask's \
         median over the best peer median (for rows where lower is better, below 1 means \
         dkv-cask is better). \"× live\": bytes on disk over the live keys' and values' bytes \
         ({} keys × {} bytes).",
        args.keys,
        crate::KEY + crate::VALUE
    );
    let _ = writeln!(s);
    let mut header = "| workload | unit |".to_string();
    let mut rule = "|---|---|".to_string();
    for e in &args.engines {
        header += &format!(" {e} |");
        rule += "---:|";
    }
    header += " dkv-cask / best peer | target | met |";
    rule += "---:|---|---|";
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "{rule}");
    // dkv-cask's 4 KiB fill over the raw write measured just before it,
    // one ratio per repetition.
    let paired: Option<Vec<f64>> = results
        .get(&Metric::DiskWrite)
        .and_then(|m| m.get("disk"))
        .zip(results.get(&Metric::BigFill).and_then(|m| m.get(CASK)))
        .map(|(d, c)| c.iter().zip(d).map(|(c, d)| c / d).collect());
    let paired = paired.as_ref();
    for row in rows(args) {
        let Some(by_engine) = results.get(&row.metric) else {
            continue;
        };
        let mut line = format!("| {} | {} |", row.name, row.unit);
        if matches!(row.metric, Metric::DiskWrite | Metric::DiskSync) {
            let v = by_engine.get("disk").map_or("—".into(), |v| cell(v));
            for j in 0..args.engines.len() {
                line += &if j == 0 {
                    format!(" {v} |")
                } else {
                    " |".to_string()
                };
            }
            line += " | (the disk, not an engine) | |";
            let _ = writeln!(s, "{line}");
            continue;
        }
        for e in &args.engines {
            line += &format!(" {} |", by_engine.get(e).map_or("—".into(), |v| cell(v)));
        }
        let cask = by_engine.get(CASK).map(|v| median(v));
        let best = peers
            .iter()
            .filter_map(|p| by_engine.get(*p).map(|v| (p.as_str(), median(v))))
            .reduce(|a, b| {
                let better = if row.higher_is_better {
                    b.1 > a.1
                } else {
                    b.1 < a.1
                };
                if better { b } else { a }
            });
        let mut ratio = match (cask, best) {
            (Some(c), Some((p, b))) if b > 0.0 => format!("{:.2}× ({p})", c / b),
            _ => "—".into(),
        };
        // The sync rows again, against the peers whose sync is an fsync.
        let is_sync_row = matches!(row.metric, Metric::Sync1 | Metric::Sync4);
        let best_fsync = peers
            .iter()
            .filter(|p| !crate::engines::weak_sync(p))
            .filter_map(|p| by_engine.get(*p).map(|v| (p.as_str(), median(v))))
            .reduce(|a, b| if b.1 > a.1 { b } else { a });
        let weak_is_best = best.is_some_and(|(p, _)| crate::engines::weak_sync(p));
        if is_sync_row
            && weak_is_best
            && let (Some(c), Some((p, b))) = (cask, best_fsync)
        {
            ratio += &format!("; {:.2}× ({p}, best that fsyncs)", c / b);
        }
        let verdict = |ok: bool| if ok { "yes" } else { "**no**" };
        let (target, met) = match (row.target, cask) {
            (Target::PeerAtLeast(x), Some(c)) => {
                let mut met = best.map_or("", |(_, b)| verdict(c / b >= x)).to_string();
                if is_sync_row
                    && weak_is_best
                    && let Some((_, b)) = best_fsync
                {
                    met += &format!("; {} vs peers that fsync", verdict(c / b >= x));
                }
                (format!("≥ {x}× best peer"), met)
            }
            (Target::AtMost(x), Some(c)) => (format!("≤ {x} {}", row.unit), verdict(c <= x).into()),
            (Target::DiskAtLeast(x), Some(_)) => match paired {
                Some(r) => (
                    format!(
                        "≥ {x}× the disk (now {} [{}–{}]×, per repetition)",
                        fixed(median(r)),
                        fixed(min(r)),
                        fixed(max(r))
                    ),
                    verdict(median(r) >= x).into(),
                ),
                None => (format!("≥ {x}× the disk"), String::new()),
            },
            _ => (String::new(), String::new()),
        };
        line += &format!(" {ratio} | {target} | {met} |");
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Durability and compaction, as mapped onto each engine:");
    let _ = writeln!(s);
    let _ = writeln!(s, "| engine | `none` | `sync` | compaction |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (e, none, sync, compact) in crate::engines::durability_table() {
        if args.engines.iter().any(|x| x == e) {
            let _ = writeln!(s, "| {e} | {none} | {sync} | {compact} |");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Every figure, per repetition (in order):");
    let _ = writeln!(s);
    let _ = writeln!(s, "```");
    for row in rows(args) {
        let Some(by_engine) = results.get(&row.metric) else {
            continue;
        };
        let _ = writeln!(s, "{} ({})", row.name, row.unit);
        for (e, v) in by_engine {
            let figures: Vec<String> = v.iter().map(|x| si(*x)).collect();
            let _ = writeln!(s, "  {e:<9} {}", figures.join("  "));
        }
    }
    let _ = writeln!(s, "```");
    s
}
