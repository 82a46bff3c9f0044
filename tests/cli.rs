//! The `dkv-cask` binary end to end: data commands, the change feed as JSON
//! lines, and `follow` between two stores. Runs the built binary.

use std::path::Path;
use std::process::{Command, Output};

fn dkv(db: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dkv-cask"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("run dkv-cask")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("utf-8 output")
}

/// The standard output of a command that succeeded without a word on
/// standard error: long commands draw their progress bars only on a
/// terminal, so piped they stay quiet.
fn quiet(o: &Output) -> String {
    let out = stdout(o);
    assert!(
        o.stderr.is_empty(),
        "stderr not empty: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn data_commands_put_get_cas_scan_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    stdout(&dkv(&db, &["put", "greeting", "hello"]));
    assert_eq!(stdout(&dkv(&db, &["get", "greeting"])), "hello\n");
    assert_eq!(
        stdout(&dkv(&db, &["cas", "greeting", "hello", "bonjour"])),
        "true\n"
    );
    assert_eq!(
        stdout(&dkv(&db, &["cas", "greeting", "hello", "hola"])),
        "false\n"
    );
    stdout(&dkv(&db, &["put", "gr2", "x"]));
    assert_eq!(
        stdout(&dkv(&db, &["scan", "--prefix", "gr"])),
        "gr2\tx\ngreeting\tbonjour\n"
    );
    stdout(&dkv(&db, &["delete", "greeting"]));
    let missing = dkv(&db, &["get", "greeting"]);
    assert_eq!(
        missing.status.code(),
        Some(3),
        "get of a missing key exits 3"
    );
    assert!(stdout(&dkv(&db, &["info"])).contains("keys: 1"));
}

#[test]
fn an_engine_error_exits_1_with_one_line_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let o = dkv(&db, &["scan", "--prefix", "a", "--start", "b"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("StartKey must have the same prefix as PrefixKey"),
        "{err}"
    );
    assert_eq!(dkv(&db, &["no-such-command"]).status.code(), Some(2));
}

#[test]
fn changes_prints_json_lines_that_follow_the_dkv_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    stdout(&dkv(&db, &["put", "a", "1"]));
    stdout(&dkv(&db, &["put", "b", "2"]));
    stdout(&dkv(&db, &["delete", "a"]));
    let lines: Vec<serde_json::Value> = stdout(&dkv(&db, &["changes", "--text"]))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["trxns"][0]["type"], "Put");
    assert_eq!(lines[0]["trxns"][0]["key"], "a");
    assert_eq!(lines[2]["trxns"][0]["type"], "Delete");
    let last = |v: &serde_json::Value| {
        v["change_number"].as_u64().unwrap() + v["number_of_trxns"].as_u64().unwrap() - 1
    };
    // Asking from the second record's last number + 1 gives the third.
    let from = (last(&lines[1]) + 1).to_string();
    let tail: Vec<serde_json::Value> = stdout(&dkv(&db, &["changes", "--from", &from]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0]["change_number"], lines[2]["change_number"]);
    // Base64 by default.
    assert_eq!(tail[0]["trxns"][0]["key"], "YQ==");
}

#[test]
fn follow_copies_a_master_into_a_slave_until_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master");
    let slave = dir.path().join("slave");
    for i in 0..5 {
        stdout(&dkv(&master, &["put", &format!("k{i}"), &format!("v{i}")]));
    }
    let out = stdout(
        &Command::new(env!("CARGO_BIN_EXE_dkv-cask"))
            .args(["follow", "--batch", "2"])
            .arg(&master)
            .arg(&slave)
            .output()
            .unwrap(),
    );
    assert!(out.contains("applied 5 changes"), "{out}");
    assert!(out.contains("lag 0"), "{out}");
    assert_eq!(stdout(&dkv(&slave, &["get", "k3"])), "v3\n");
    // Following again finds nothing new.
    let again = stdout(
        &Command::new(env!("CARGO_BIN_EXE_dkv-cask"))
            .arg("follow")
            .arg(&master)
            .arg(&slave)
            .output()
            .unwrap(),
    );
    assert!(again.contains("applied 0 changes"), "{again}");
}

#[test]
fn backup_verify_restore_and_snapshot_commands_round_trip_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_dkv-cask"))
            .args(args)
            .output()
            .unwrap()
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    stdout(&dkv(&db, &["put", "kept", "1"]));
    let backup = dir.path().join("backup");
    let out = quiet(&run(&[&os("backup"), db.as_os_str(), backup.as_os_str()]));
    assert!(out.contains("backed up"), "{out}");
    let out = quiet(&run(&[&os("verify-backup"), backup.as_os_str()]));
    assert!(out.contains("is intact"), "{out}");
    stdout(&dkv(&db, &["put", "later", "2"]));
    let out = quiet(&run(&[&os("restore"), backup.as_os_str(), db.as_os_str()]));
    assert!(out.contains("restored"), "{out}");
    assert_eq!(dkv(&db, &["get", "later"]).status.code(), Some(3));
    assert_eq!(stdout(&dkv(&db, &["get", "kept"])), "1\n");
    // A damaged backup fails verification with exit code 1.
    let seg = std::fs::read_dir(&backup)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::remove_file(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() - 1]).unwrap();
    let o = run(&[&os("verify-backup"), backup.as_os_str()]);
    assert_eq!(o.status.code(), Some(1));

    let snap = dir.path().join("snap.bin");
    let out = quiet(&run(&[
        &os("snapshot"),
        &os("export"),
        db.as_os_str(),
        snap.as_os_str(),
    ]));
    assert!(out.contains("exported"), "{out}");
    let other = dir.path().join("other");
    stdout(&dkv(&other, &["put", "gone", "x"]));
    let out = quiet(&run(&[
        &os("snapshot"),
        &os("import"),
        snap.as_os_str(),
        other.as_os_str(),
    ]));
    assert!(out.contains("imported"), "{out}");
    assert_eq!(stdout(&dkv(&other, &["get", "kept"])), "1\n");
    assert_eq!(dkv(&other, &["get", "gone"]).status.code(), Some(3));
}

#[test]
fn verify_reports_damage_by_file_and_offset_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    for i in 0..20 {
        stdout(&dkv(&db, &["put", &format!("key{i}"), "some value"]));
    }
    let clean = stdout(&dkv(&db, &["verify"]));
    assert!(clean.contains("no damage"), "{clean}");
    // Flip a byte inside the first record (after the 32-byte header).
    let seg = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[50] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let o = dkv(&db, &["verify"]);
    assert_eq!(o.status.code(), Some(4));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("damaged") || report.contains("torn tail"),
        "{report}"
    );
    assert!(
        report.contains(&seg.file_name().unwrap().to_string_lossy().to_string()),
        "{report}"
    );
    // Nothing was repaired behind the operator's back.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn metrics_prints_a_prometheus_exposition_with_dkvs_names() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    stdout(&dkv(&db, &["put", "a", "1"]));
    let text = stdout(&dkv(&db, &["metrics"]));
    assert!(
        text.contains("# TYPE dkv_storage_latency_cask summary"),
        "{text}"
    );
    assert!(text.contains("dkv_cask_keys 1"), "{text}");
}

#[test]
fn json_output_parses_back_for_get_scan_cas_info_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    stdout(&dkv(&db, &["put", "k1", "v1"]));
    stdout(&dkv(&db, &["put", "k2", "v2"]));
    let parse = |s: String| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect()
    };
    let got = parse(stdout(&dkv(&db, &["--json", "get", "k1", "k2"])));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["key"], "azE=");
    assert_eq!(got[0]["value"], "djE=");
    assert_eq!(got[0]["expire_ts"], 0);
    let scanned = parse(stdout(&dkv(&db, &["scan", "--json", "--prefix", "k"])));
    assert_eq!(scanned.len(), 2);
    assert_eq!(scanned[1]["value"], "djI=");
    let cas = parse(stdout(&dkv(&db, &["--json", "cas", "k1", "v1", "v9"])));
    assert_eq!(cas[0]["swapped"], true);
    let info = parse(stdout(&dkv(&db, &["--json", "info"])));
    assert_eq!(info[0]["keys"], 2);
    assert_eq!(info[0]["format_version"], 2);
    assert!(info[0]["last_change_number"].as_u64().unwrap() > 0);
    let verify = parse(stdout(&dkv(&db, &["--json", "verify"])));
    assert_eq!(verify[0]["damaged"].as_array().unwrap().len(), 0);
    assert!(verify[0]["torn_tail"].is_null());
}

#[test]
fn compact_keeps_the_log_for_followers_unless_told_and_info_reports_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    for round in 0..3 {
        for k in 0..5 {
            stdout(&dkv(&db, &["put", &format!("k{k}"), &format!("v{round}")]));
        }
    }
    stdout(&dkv(&db, &["delete", "k0"]));
    let kept = stdout(&dkv(&db, &["compact"]));
    assert!(kept.starts_with("nothing to merge"), "{kept}");
    let merged = stdout(&dkv(&db, &["compact", "--ignore-retention"]));
    assert!(merged.starts_with("merged "), "{merged}");
    let info = stdout(&dkv(&db, &["--json", "info"]));
    let v: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
    assert_eq!(v["keys"], 4);
    assert_eq!(v["merged_segments"], 1);
    // The store was closed cleanly: its index comes from the keydir file.
    assert_eq!(v["from_keydir_file"], true);
    assert_eq!(v["segments_from_hints"], 0);
    assert!(v["live_bytes"].as_u64().unwrap() > v["data_bytes"].as_u64().unwrap());
    assert_eq!(
        stdout(&dkv(&db, &["scan"])),
        "k1\tv2\nk2\tv2\nk3\tv2\nk4\tv2\n"
    );
    // A follower behind the merged log is told so, with the typed error.
    let o = dkv(&db, &["changes", "--from", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no longer in the log"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn bench_plot_writes_an_svg_with_both_panels() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("p.svg");
    let o = Command::new(env!("CARGO_BIN_EXE_dkv-cask"))
        .args([
            "bench",
            "--keys",
            "2000",
            "--seconds",
            "0.2",
            "--writers",
            "1,2",
        ])
        .args(["--scans", "10", "--backup-mib", "0", "--dir"])
        .arg(dir.path())
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("run dkv-cask");
    let out = stdout(&o);
    assert!(out.contains("plot written to "), "{out}");
    // The reopen row: from the keydir file, against hints.
    assert!(
        out.contains("| reopen to first get, clean close |") && out.contains("from hints"),
        "{out}"
    );
    let text = std::fs::read_to_string(&svg).expect("the plot exists");
    assert!(text.starts_with("<svg") || text.starts_with("<?xml"));
    assert!(text.trim_end().ends_with("</svg>"));
    for axis in [
        "throughput (ops/s, log scale)",
        "sync mode (× writer threads)",
        "latency per operation (µs, log scale)",
        "fraction of operations at or below",
        "raw 4 KiB pwrite+fdatasync",
    ] {
        assert!(text.contains(axis), "no {axis:?} in the plot");
    }
    // One curve per CDF series: two Never put rows, random get, and one
    // per writer count; the bars are rectangles (and the background).
    let curves = ["sequential put (Never)", "random put (Never)", "random get"]
        .into_iter()
        .chain(["put (Always), 1 writer ", "put (Always), 2 writers"]);
    for curve in curves {
        assert!(text.contains(curve), "no legend entry {curve:?}");
    }
    assert!(text.matches("<polyline").count() >= 5);
    assert!(text.matches("<rect").count() > 4);
}

#[test]
fn long_commands_draw_a_progress_bar_on_a_terminal() {
    // `script` runs the command on a pseudo-terminal; skip where it is
    // missing (it is part of util-linux).
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("skipped: no `script` to provide a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    stdout(&dkv(&db, &["put", "k", "v"]));
    let bin = env!("CARGO_BIN_EXE_dkv-cask");
    let on_terminal = |args: &str| {
        let o = Command::new("script")
            .args(["-qec", &format!("{bin} {args}"), "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{args}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = on_terminal(&format!("--db {} verify", db.display()));
    assert!(
        shown.contains("verify [") && shown.contains("verify: ") && shown.contains("no damage"),
        "{shown}"
    );
    let backup = dir.path().join("backup");
    let shown = on_terminal(&format!("backup {} {}", db.display(), backup.display()));
    assert!(
        shown.contains("backup [") && shown.contains("100%"),
        "{shown}"
    );
    // Piped, the same command prints only its result.
    assert!(!quiet(&dkv(&db, &["verify"])).contains('['));
}
