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
