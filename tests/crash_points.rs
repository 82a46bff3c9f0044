//! Every crash point of a workload, under simulated power loss.
//!
//! The workload (puts, batches, deletes, compare-and-sets, rollovers, merges,
//! backups, a restore and reopens, all under `SyncMode::Always`) runs once
//! on a [`Recorder`], which records every change the store makes on disk.
//! Then, for each point in that record, the test builds the disk images a
//! power loss there could leave (only the synced state; everything, as after
//! a process crash; a random prefix of each file's and folder's unsynced
//! changes with a torn last write; each block of a file as of its own random
//! number of unsynced writes), opens each, and checks:
//!
//! - the store opens;
//! - it holds exactly the state after the last acknowledged operation, or
//!   after the one in flight (wholly there or wholly absent), with the
//!   matching last change number: no acknowledged write is lost and no
//!   deleted key comes back;
//! - the change feed from its oldest record is the one the live store served
//!   at that state: no gap, no record that was not acknowledged, and it ends
//!   at the last change number;
//! - every acknowledged backup verifies, and the newest restores to the
//!   state it was taken at.
//!
//! CI checks every `DKV_CRASH_STRIDE`-th point (default 40) of a workload of
//! `DKV_CRASH_OPS` operations (default 2,000); `DKV_CRASH_STRIDE=1` checks
//! every point (RELIABILITY.md has the figures).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use dkv_cask::crash::{Loss, Recorder};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{
    Backupable, ChangePropagator, FaultInjector, InjectedError, KvStore, MergeOptions, Options,
    Retention, Store, SyncMode,
};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// The store's contents, last change number and change feed after an
/// operation.
#[derive(Clone, Debug, PartialEq)]
struct State {
    contents: Model,
    change_number: u64,
    /// The last change number of each record `load_changes` serves, from
    /// the oldest kept.
    feed: Vec<u64>,
}

/// One operation of the workload, as run.
#[derive(Debug)]
struct Done {
    what: String,
    /// The recorded changes it made: `first..end`.
    first: usize,
    end: usize,
    /// The state once it returned.
    after: State,
    /// The backup it made (folder name inside the root, state it holds).
    backup: Option<(String, State)>,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn options(fs: Option<Arc<Recorder>>) -> Options {
    let mut o = Options {
        sync_mode: SyncMode::Always,
        segment_size: 8 << 10,
        max_batch_bytes: 2 << 10,
        retention: Retention::none(),
        merge: MergeOptions {
            automatic: false,
            ..MergeOptions::default()
        },
        ..Options::default()
    };
    if let Some(fs) = fs {
        o.file_system = fs;
    }
    o
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

fn state(store: &Store, label: &str) -> State {
    let feed: Vec<u64> = store
        .load_changes(0, usize::MAX)
        .unwrap_or_else(|e| panic!("{label}: load_changes: {e}"))
        .iter()
        .map(|c| c.change_number + u64::from(c.number_of_trxns) - 1)
        .collect();
    assert!(
        feed.windows(2).all(|w| w[0] < w[1]),
        "{label}: change numbers must rise"
    );
    if let Some(&last) = feed.last() {
        assert_eq!(
            last,
            store.last_change_number(),
            "{label}: the feed ends early"
        );
    }
    State {
        contents: all_pairs(store).into_iter().collect(),
        change_number: store.last_change_number(),
        feed,
    }
}

/// A run of the workload: what each operation did, and the failure that
/// stopped it, if any.
struct Run {
    done: Vec<Done>,
    failed: Option<(String, dkv_cask::Error)>,
}

/// Runs the workload on a store in `root` opened with `opts`; `calls`
/// counts the file-system calls so far. Stops at the first failure.
fn run_workload(root: &Path, opts: &Options, calls: &dyn Fn() -> usize, ops: usize) -> Run {
    let db = root.join("db");
    let mut rng = Rng::new(0xC4A5);
    let mut done = Vec::new();
    let first = calls();
    let mut store = match Store::open(&db, opts.clone()) {
        Ok(s) => s,
        Err(e) => {
            return Run {
                done,
                failed: Some(("open".into(), e)),
            };
        }
    };
    done.push(Done {
        what: "open".into(),
        first,
        end: calls(),
        after: state(&store, "open"),
        backup: None,
    });
    let mut model = Model::new();
    let mut backups: Vec<(String, State)> = Vec::new();
    for i in 1..=ops {
        let first = calls();
        let mut backup = None;
        let key = |rng: &mut Rng| format!("key-{:03}", rng.below(150)).into_bytes();
        let step = (|| -> dkv_cask::Result<String> {
            if i % 400 == 0 {
                let name = format!("backup-{}", backups.len());
                store.backup_to(&root.join(&name))?;
                let s = state(&store, "backup");
                backups.push((name.clone(), s.clone()));
                backup = Some((name.clone(), s));
                Ok(format!("backup to {name}"))
            } else if i == ops * 3 / 4 && !backups.is_empty() {
                let (name, s) = backups[0].clone();
                store = store.restore_from(&root.join(&name))?;
                model = s.contents;
                Ok(format!("restore {name}"))
            } else if i % 150 == 0 {
                store.merge()?;
                Ok("merge".into())
            } else if i % 333 == 0 {
                store.close()?;
                store = Store::open(&db, opts.clone())?;
                Ok("reopen".into())
            } else {
                match rng.below(20) {
                    0..=12 => {
                        let n = 1 + rng.below(3) as usize;
                        let pairs: Vec<KvPair> = (0..n)
                            .map(|_| {
                                let len = 10 + rng.below(150) as usize;
                                pair(key(&mut rng), rng.bytes(len))
                            })
                            .collect();
                        store.put(&pairs)?;
                        for p in &pairs {
                            model.insert(p.key.clone(), p.value.clone());
                        }
                        Ok(format!("put of {n}"))
                    }
                    13..=16 => {
                        let k = key(&mut rng);
                        store.delete(&k)?;
                        model.remove(&k);
                        Ok("delete".into())
                    }
                    _ => {
                        let k = key(&mut rng);
                        let old = model.get(&k).cloned().unwrap_or_default();
                        let new = rng.bytes(20);
                        let swapped = store.compare_and_set(&cas(&k, &old, &new, 0))?;
                        assert!(swapped, "cas with the current value must swap");
                        model.insert(k, new);
                        Ok("cas".into())
                    }
                }
            }
        })();
        let what = match step {
            Ok(what) => what,
            Err(e) => {
                return Run {
                    done,
                    failed: Some((format!("operation {i}"), e)),
                };
            }
        };
        let after = state(&store, &what);
        assert_eq!(after.contents, model, "the live store after {what}");
        done.push(Done {
            what,
            first,
            end: calls(),
            after,
            backup,
        });
    }
    store.close().expect("close");
    Run { done, failed: None }
}

/// Whether `got` is one of `allowed`, or (with a merge in flight, which
/// commits run by run) one of them with an oldest part of the feed merged
/// away.
fn is_allowed(got: &State, allowed: &[&State], merging: bool) -> bool {
    allowed.contains(&got)
        || merging
            && allowed.iter().any(|s| {
                s.contents == got.contents
                    && s.change_number == got.change_number
                    && s.feed.ends_with(&got.feed)
            })
}

fn describe(states: &[&State]) -> Vec<(usize, u64, usize, Option<u64>)> {
    states
        .iter()
        .map(|s| {
            (
                s.contents.len(),
                s.change_number,
                s.feed.len(),
                s.feed.first().copied(),
            )
        })
        .collect()
}

/// Copies the image of `db` into a fresh store folder and opens it.
fn open_image(image: &Path) -> dkv_cask::Result<Store> {
    Store::open(image.join("db"), options(None))
}

#[test]
fn every_crash_point_of_a_workload_keeps_every_acknowledged_write() {
    let ops = env("DKV_CRASH_OPS", 2000);
    let stride = env("DKV_CRASH_STRIDE", 40).max(1);
    let root = scratch();
    let recorder = Recorder::new(root.path()).expect("recorder");
    let run = run_workload(
        root.path(),
        &options(Some(recorder.clone())),
        &|| recorder.ops(),
        ops,
    );
    if let Some((what, e)) = run.failed {
        panic!("{what} failed: {e}");
    }
    let done = run.done;
    assert_eq!(recorder.untracked(), 0, "a change bypassed the recorder");
    for kind in ["merge", "backup", "restore", "reopen"] {
        assert!(
            done.iter().any(|d| d.what.starts_with(kind)),
            "the workload has no {kind}"
        );
    }

    let mut replay = recorder.replay();
    let total = replay.len();
    let mut points: Vec<usize> = (0..=total).step_by(stride).collect();
    points.push(total);
    points.dedup();
    let empty = State {
        contents: Model::new(),
        change_number: 0,
        feed: Vec::new(),
    };
    let (mut checked, mut images) = (0, 0);
    for &point in &points {
        replay.advance_to(point);
        // The last operation whose changes all happened, and the one in
        // flight (some of its changes happened).
        let acked = done.iter().rposition(|d| d.end <= point);
        let allowed: Vec<&State> = {
            let a = acked.map_or(&empty, |j| &done[j].after);
            let next = acked.map_or(0, |j| j + 1);
            let mut v = vec![a];
            if let Some(d) = done.get(next).filter(|d| d.first < point) {
                v.push(&d.after);
            }
            v
        };
        let in_flight = acked.map_or(0, |j| j + 1);
        let backups: Vec<&(String, State)> = done[..acked.map_or(0, |j| j + 1)]
            .iter()
            .filter_map(|d| d.backup.as_ref())
            .collect();
        for loss in [
            Loss::AllUnsynced,
            Loss::Nothing,
            Loss::RandomPrefix { seed: point as u64 },
            // Another seed, so that folders do not keep the same prefix
            // as in the image before.
            Loss::Reordered {
                seed: point as u64 ^ 0x5EED,
            },
        ] {
            let label = format!(
                "point {point} of {total} ({loss:?}), in flight: {}",
                done.get(in_flight).map_or("nothing", |d| d.what.as_str())
            );
            let image = scratch();
            replay
                .image(loss)
                .write_to(image.path())
                .expect("write image");
            let store = open_image(image.path())
                .unwrap_or_else(|e| panic!("{label}: the image does not open: {e}"));
            let got = state(&store, &label);
            let merging = done.get(in_flight).is_some_and(|d| d.what == "merge");
            assert!(
                is_allowed(&got, &allowed, merging),
                "{label}: holds {:?}, expected one of {:?}",
                describe(&[&got]),
                describe(&allowed)
            );
            for (name, _) in &backups {
                dkv_cask::verify_backup(&image.path().join(name))
                    .unwrap_or_else(|e| panic!("{label}: acknowledged {name} is damaged: {e}"));
            }
            // The newest acknowledged backup restores to what it held,
            // whatever the crash kept of the store beside it.
            if let Some((name, at)) = backups.last() {
                let restored = restore_into_new_store(image.path(), &image.path().join(name));
                assert_eq!(
                    state(&restored, &label),
                    *at,
                    "{label}: {name} restores wrong"
                );
                restored.close().unwrap();
            }
            store.close().unwrap();
            images += 1;
        }
        checked += 1;
    }
    println!(
        "{checked} crash points of {total} ({} operations), {images} images checked",
        done.len()
    );
}

fn restore_into_new_store(image: &Path, backup: &Path) -> Store {
    let target: PathBuf = image.join("restored");
    let store = Store::open(&target, options(None)).expect("open restore target");
    store.restore_from(backup).expect("restore")
}

/// Whether `e` is the injected error or the poisoning it caused.
fn is_injected(e: &dkv_cask::Error, kind: InjectedError) -> bool {
    let errno = match kind {
        InjectedError::Eio => 5,
        InjectedError::NoSpace => 28,
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cause = c.source();
    }
    matches!(e, dkv_cask::Error::Poisoned { .. })
        || e.to_string().contains(&format!("os error {errno}"))
}

#[test]
fn a_fault_at_every_io_call_of_the_workload_loses_no_acknowledged_write() {
    let ops = env("DKV_CRASH_OPS", 2000);
    let stride = env("DKV_FAULT_STRIDE", 300).max(1);
    let with_faults = |faults: &Arc<FaultInjector>| Options {
        fault_injector: Some(Arc::clone(faults)),
        ..options(None)
    };
    // A clean run counts the calls and gives the state after each operation.
    let faults = Arc::new(FaultInjector::new());
    let root = scratch();
    let clean = run_workload(
        root.path(),
        &with_faults(&faults),
        &|| faults.calls() as usize,
        ops,
    );
    assert!(clean.failed.is_none());
    let calls = faults.calls();
    let empty = State {
        contents: Model::new(),
        change_number: 0,
        feed: Vec::new(),
    };
    let (mut injected, mut after_commit, mut past_the_end) = (0, 0, 0);
    for (i, n) in (0..calls).step_by(stride).enumerate() {
        // Alternate per run, not by `n`: an even stride would try only one.
        let kind = if i % 2 == 0 {
            InjectedError::Eio
        } else {
            InjectedError::NoSpace
        };
        let faults = Arc::new(FaultInjector::new());
        faults.fail_after(n, kind);
        let root = scratch();
        let run = run_workload(
            root.path(),
            &with_faults(&faults),
            &|| faults.calls() as usize,
            ops,
        );
        let label = format!("failing call {n} of {calls} with {kind:?}");
        // The n-th call exists and fails. (A run's count can differ from
        // the clean run's by a call or so: a backup's seal takes the spare
        // segment only if its background zero fill, which the injector
        // does not count, is done, else it starts an unpreallocated
        // segment, which the next reopen zero-fills with a counted write.
        // So the last few calls may not exist in a run, which then ends as
        // the clean run did.)
        if faults.fired() == 0 {
            assert!(n + 8 >= calls, "{label}: the fault did not fire");
            assert!(run.failed.is_none(), "{label}: failed without a fault");
            let last = &clean.done.last().unwrap().after;
            assert_eq!(&run.done.last().unwrap().after, last, "{label}");
            past_the_end += 1;
            continue;
        }
        let Some((what, err)) = run.failed else {
            // The failed call was one whose error the engine ignores by
            // design (a merge's clean-up after its commit): the workload
            // went on and ended as usual.
            let last = &clean.done.last().unwrap().after;
            assert_eq!(&run.done.last().unwrap().after, last, "{label}");
            after_commit += 1;
            continue;
        };
        assert!(is_injected(&err, kind), "{label}: {what} failed with {err}");
        injected += 1;
        let j = run.done.len();
        let mut allowed = vec![j.checked_sub(1).map_or(&empty, |k| &clean.done[k].after)];
        allowed.push(&clean.done[j].after);
        let merging = clean.done[j].what == "merge";
        let store = Store::open(root.path().join("db"), options(None))
            .unwrap_or_else(|e| panic!("{label}: reopen after the failure: {e}"));
        let got = state(&store, &label);
        assert!(
            is_allowed(&got, &allowed, merging),
            "{label}, in {}: holds {:?}, expected one of {:?}",
            clean.done[j].what,
            describe(&[&got]),
            describe(&allowed)
        );
        store
            .put(&[pair("after", "reopen")])
            .unwrap_or_else(|e| panic!("{label}: a write after reopen: {e}"));
        store.close().unwrap();
    }
    println!(
        "{calls} calls; {injected} faults stopped the workload, {after_commit} failed a call whose error the engine ignores by design, {past_the_end} runs ended before their call"
    );
}

/// Under `SyncMode::Never` many records are unsynced at once, so a power
/// loss can keep a later one while losing an earlier one (the page cache
/// writes blocks back in any order). Recovery must then cut the log at the
/// first hole: the store comes back as it was after some operation, no
/// older than what the synced state alone holds, with a change feed that
/// has no gap and no record from beyond the hole, and the records cut off
/// stay gone after the next write and reopen.
#[test]
fn unsynced_writes_that_reach_the_disk_out_of_order_recover_to_a_point_in_history() {
    let ops = env("DKV_REORDER_OPS", 300);
    let seeds = env("DKV_REORDER_SEEDS", 3) as u64;
    let stride = env("DKV_CRASH_STRIDE", 40).max(1) / 8 + 1;
    let root = scratch();
    let recorder = Recorder::new(root.path()).expect("recorder");
    let never = |fs| Options {
        sync_mode: SyncMode::Never,
        ..options(fs)
    };
    let store = Store::open(root.path().join("db"), never(Some(recorder.clone()))).unwrap();
    let mut rng = Rng::new(0x0DD5);
    // After each operation: the recorded changes made by then, the
    // contents and last change number (the live feed serves synced changes
    // only, so it is read once, at the end), and the value it put.
    let now = |store: &Store| -> (Model, u64) {
        (
            all_pairs(store).into_iter().collect(),
            store.last_change_number(),
        )
    };
    let mut history = vec![(recorder.ops(), now(&store), None)];
    for i in 0..ops {
        let key = format!("k{:03}", rng.below(50));
        // Values of several sizes, so that records straddle blocks.
        let len = [8, 120, 700, 1900][rng.below(4) as usize];
        let value = rng.bytes(len);
        let put = if rng.below(10) == 0 {
            store.delete(key.as_bytes()).unwrap();
            None
        } else {
            store.put(&[pair(&key, &value)]).unwrap();
            Some(value)
        };
        history.push((recorder.ops(), now(&store), put));
        if i % 37 == 36 {
            store.sync().unwrap();
        }
    }
    store.sync().unwrap();
    let full_feed = state(&store, "at the end").feed;
    store.close().unwrap();
    assert_eq!(recorder.untracked(), 0, "a change bypassed the recorder");

    // The index of the operation whose state `got` is, among `range`.
    let find = |got: &State, range: std::ops::RangeInclusive<usize>, label: &str| -> usize {
        let (from, to) = (*range.start(), *range.end());
        history[range]
            .iter()
            .position(|h| h.1.0 == got.contents && h.1.1 == got.change_number)
            .map(|k| from + k)
            .unwrap_or_else(|| {
                panic!(
                    "{label}: holds {:?}, which is no state from operation {from} to {to}",
                    describe(&[got])
                )
            })
    };
    let mut replay = recorder.replay();
    let total = replay.len();
    let (mut images, mut cut, mut kept_after_hole) = (0, 0, 0);
    let mut points: Vec<usize> = (0..=total).step_by(stride).collect();
    points.push(total);
    points.dedup();
    for point in points {
        replay.advance_to(point);
        // Operations `..applied` are wholly recorded by now; the one after
        // them may be in flight.
        let applied = history.iter().take_while(|h| h.0 <= point).count();
        let ceiling = applied.min(history.len() - 1);
        // The floor: what the synced state alone holds (syncs, rollovers
        // and close all count).
        let floor = {
            let image = scratch();
            let label = format!("point {point} of {total} (AllUnsynced)");
            replay
                .image(Loss::AllUnsynced)
                .write_to(image.path())
                .expect("write image");
            let store = Store::open(image.path().join("db"), never(None))
                .unwrap_or_else(|e| panic!("{label}: the image does not open: {e}"));
            let k = find(&state(&store, &label), 0..=ceiling, &label);
            store.close().unwrap();
            k
        };
        for seed in 0..seeds {
            let loss = Loss::Reordered {
                seed: (point as u64) << 8 | seed,
            };
            let label = format!("point {point} of {total} ({loss:?})");
            let image = scratch();
            replay
                .image(loss)
                .write_to(image.path())
                .expect("write image");
            let files: Vec<Vec<u8>> = std::fs::read_dir(image.path().join("db"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| std::fs::read(e.path()).ok())
                        .collect()
                })
                .unwrap_or_default();
            let mut store = Store::open(image.path().join("db"), never(None))
                .unwrap_or_else(|e| panic!("{label}: the image does not open: {e}"));
            let got = state(&store, &label);
            let k = find(&got, floor..=ceiling, &label);
            // The feed is the whole log up to that operation: no gap.
            let feed: Vec<u64> = full_feed
                .iter()
                .copied()
                .take_while(|&c| c <= got.change_number)
                .collect();
            assert_eq!(got.feed, feed, "{label}: the change feed differs");
            if k + 1 < applied {
                cut += 1;
                // A value put after the first lost operation, still whole
                // in the image: a later write reached the disk before an
                // earlier one, and recovery cut it off with the hole.
                let later = history[k + 2..=ceiling].iter().filter_map(|h| h.2.as_ref());
                if later.filter(|v| v.len() >= 100).any(|v| {
                    files
                        .iter()
                        .any(|f| f.windows(v.len()).any(|w| w == &v[..]))
                }) {
                    kept_after_hole += 1;
                }
            }
            // What was cut off stays gone after the next write and reopen.
            store.put(&[pair("after", "crash")]).unwrap();
            store.close().unwrap();
            store = Store::open(image.path().join("db"), never(None))
                .unwrap_or_else(|e| panic!("{label}: the store does not reopen: {e}"));
            let again = state(&store, &label);
            let mut expected = got.contents.clone();
            expected.insert(b"after".to_vec(), b"crash".to_vec());
            assert_eq!(
                again.contents, expected,
                "{label}: after a write and reopen"
            );
            assert_eq!(
                again.feed[..again.feed.len() - 1],
                got.feed[..],
                "{label}: the feed after a write and reopen"
            );
            store.close().unwrap();
            images += 1;
        }
    }
    // Images must have lost unsynced operations, and some must have held a
    // later write past a hole, or the test shows nothing.
    assert!(
        cut > images / 10 && kept_after_hole > 0,
        "{cut} of {images} images lost an operation, {kept_after_hole} past a hole"
    );
    println!(
        "{images} reordered images of {total} recorded changes: {cut} lost operations, \
         {kept_after_hole} held a later write past a hole, cut off"
    );
}
