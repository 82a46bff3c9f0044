//! The kill -9 crash loop: a child process writes with several threads
//! (a background merge running meanwhile) and records every acknowledged
//! write in a side log; the parent kills it with SIGKILL at a random
//! moment, reopens the store, and checks that every acknowledged write is
//! there. Rounds alternate between `SyncMode::Always` (appends with
//! `pwrite`, each put synced) and `SyncMode::Never` (appends copied into
//! the active segment's map, never synced: a process crash must still keep
//! every acknowledged write, which sits in the page cache). CI runs a
//! short loop; `DKV_KILL_ITERATIONS=1000 cargo test --release --test kill9`
//! runs a long one.
//!
//! Regression (of the test itself): with one side log per writer, a line
//! cut short by a kill ran into the next round's first line.
//!
//! The child is this test binary re-run with only
//! `kill9_child_writes_until_killed`, which does its work only when
//! `CHILD_DIR_VAR` is set.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use dkv_cask::{KvStore, Options, Store, SyncMode};

const CHILD_DIR_VAR: &str = "DKV_KILL9_CHILD_DIR";
const CHILD_MODE_VAR: &str = "DKV_KILL9_SYNC_MODE";
const WRITERS: u64 = 4;

/// Small segments and a background merge that rewrites even fully live
/// segments (their record headers are more than 30% of them), so kills also
/// land in merges.
fn options(sync_mode: SyncMode) -> Options {
    Options {
        sync_mode,
        segment_size: 64 << 10,
        max_batch_bytes: 16 << 10,
        retention: dkv_cask::Retention::none(),
        merge: dkv_cask::MergeOptions {
            automatic: true,
            dead_ratio: 0.3,
            check_interval: Duration::from_millis(10),
            ..dkv_cask::MergeOptions::default()
        },
        ..Options::default()
    }
}

/// The child: writes until killed. Each writer appends `key value\n` to
/// its own side log after its put returned.
#[test]
fn kill9_child_writes_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let dir = Path::new(&dir);
    let sync_mode = match std::env::var(CHILD_MODE_VAR).as_deref() {
        Ok("never") => SyncMode::Never,
        _ => SyncMode::Always,
    };
    let store = Store::open(dir.join("db"), options(sync_mode)).expect("child opens the store");
    let round: u64 = std::env::var("DKV_KILL9_ROUND").unwrap().parse().unwrap();
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let store = &store;
            s.spawn(move || {
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("acked-{round}-{t}.log")))
                    .unwrap();
                for i in 0.. {
                    let key = format!("r{round}-t{t}-{i}");
                    let value = format!("{}", i * 7 + t);
                    if i % 5 == 4 {
                        // A batch of two: both or neither.
                        store
                            .put(&[pair(&key, &value), pair(format!("{key}-b"), &value)])
                            .unwrap();
                        // One write for both lines, so a kill never logs half.
                        log.write_all(format!("{key} {value}\n{key}-b {value}\n").as_bytes())
                            .unwrap();
                    } else {
                        store.put(&[pair(&key, &value)]).unwrap();
                        writeln!(log, "{key} {value}").unwrap();
                    }
                }
            });
        }
    });
}

/// Every complete line of the side logs of `round`: an acknowledged write.
/// (One log per round and writer, so a line a kill cut short never runs
/// into the next round's first line.)
fn acknowledged(dir: &Path, round: u64) -> HashMap<String, String> {
    let mut acked = HashMap::new();
    for t in 0..WRITERS {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("acked-{round}-{t}.log"))) else {
            continue;
        };
        // A kill can cut the last line short.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        for line in complete.lines() {
            let (k, v) = line.split_once(' ').expect("key value");
            acked.insert(k.to_string(), v.to_string());
        }
    }
    acked
}

/// The write number `i` of a key `r{round}-t{thread}-{i}`.
fn batch_index(key: &str) -> u64 {
    key.rsplit('-')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("a key not of the child's form: {key}"))
}

#[test]
fn acknowledged_writes_survive_kill_9_at_random_moments() {
    let iterations: u64 = std::env::var("DKV_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::from_env("kill9");
    let exe = std::env::current_exe().unwrap();
    let mut checked = 0;
    let mut all_acked: HashMap<String, String> = HashMap::new();
    for round in 0..iterations {
        let (mode, sync_mode) = if round % 2 == 0 {
            ("always", SyncMode::Always)
        } else {
            ("never", SyncMode::Never)
        };
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill9_child_writes_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_VAR, dir.path())
            .env("DKV_KILL9_ROUND", round.to_string())
            .env(CHILD_MODE_VAR, mode)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng.below(150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = Store::open(dir.path().join("db"), options(sync_mode))
            .unwrap_or_else(|e| panic!("round {round} ({mode}): reopen after kill -9 failed: {e}"));
        // This round's acknowledged writes, all of them, and a sample of
        // the earlier rounds' (a later crash must not lose them either).
        let fresh = acknowledged(dir.path(), round);
        let mut check: Vec<(&String, &String)> = fresh.iter().collect();
        let older: Vec<(&String, &String)> = all_acked.iter().collect();
        for _ in 0..older.len().min(2000) {
            check.push(older[rng.below(older.len() as u64) as usize]);
        }
        let keys: Vec<&[u8]> = check.iter().map(|(k, _)| k.as_bytes()).collect();
        let found: HashMap<Vec<u8>, Vec<u8>> = keys
            .chunks(512)
            .flat_map(|c| store.get(c).unwrap())
            .map(|p| (p.key, p.value))
            .collect();
        for (k, v) in &check {
            assert_eq!(
                found.get(k.as_bytes()).map(Vec::as_slice),
                Some(v.as_bytes()),
                "round {round} ({mode}): acknowledged write {k} lost"
            );
        }
        checked += fresh.len();
        all_acked.extend(fresh);
        // Batches are all-or-nothing, acknowledged or not: each second key
        // has its first, and each first key (every fifth write) its second.
        let keys: HashSet<String> = store
            .iter(&dkv_cask::IterationOptions::new())
            .unwrap()
            .map(|p| String::from_utf8(p.unwrap().key).unwrap())
            .collect();
        for key in &keys {
            if let Some(first) = key.strip_suffix("-b") {
                assert!(
                    keys.contains(first),
                    "round {round}: half a batch ({key} without {first})"
                );
            } else if batch_index(key) % 5 == 4 {
                assert!(
                    keys.contains(&format!("{key}-b")),
                    "round {round}: half a batch ({key} without its -b)"
                );
            }
        }
        if round % 50 == 49 {
            // Keep the store small enough for long loops.
            drop(store);
            let reopened = Store::open(dir.path().join("db"), options(sync_mode)).unwrap();
            for k in all_acked.keys() {
                // The batch's second key too: a kill may have cut the log.
                reopened.delete(k.as_bytes()).unwrap();
                reopened.delete(format!("{k}-b").as_bytes()).unwrap();
            }
            all_acked.clear();
            reopened.close().unwrap();
            continue;
        }
        store.close().unwrap();
    }
    assert!(checked > 0, "the children acknowledged no write at all");
    let store = Store::open(dir.path().join("db"), options(SyncMode::Always)).unwrap();
    let merged = store
        .stats()
        .unwrap()
        .segments
        .iter()
        .filter(|s| s.kind == dkv_cask::format::SegmentKind::Merged)
        .count();
    eprintln!(
        "kill9: {iterations} kills, {checked} acknowledged writes checked, {merged} merged segments at the end"
    );
}
