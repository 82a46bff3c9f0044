//! DKV's temp-file and folder helpers (`CreateTempFile`, `CreateTempFolder`,
//! `RenameFolder`), as the seed documents them.

use std::fs;
use std::io::{Read, Seek, Write};

use dkv_cask::{Error, create_temp_file, create_temp_folder, rename_folder};

/// The 14-digit `YYYYMMDDhhmmss` stamp right after the prefix.
fn stamp_after<'a>(name: &'a str, prefix: &str) -> &'a str {
    let rest = name
        .strip_prefix(prefix)
        .expect("name starts with the prefix");
    &rest[..14]
}

#[test]
fn a_temp_file_is_named_prefix_timestamp_random_and_open_for_reading_and_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut file, path) = create_temp_file(dir.path(), "snap-").unwrap();
    assert_eq!(path.parent().unwrap(), dir.path());
    let name = path.file_name().unwrap().to_str().unwrap();
    let stamp = stamp_after(name, "snap-");
    assert!(stamp.bytes().all(|b| b.is_ascii_digit()), "{name}");
    assert!(stamp.starts_with("20"), "{name}");
    assert!(
        name.len() > "snap-".len() + 14,
        "a random suffix follows: {name}"
    );
    file.write_all(b"hello").unwrap();
    file.rewind().unwrap();
    let mut back = String::new();
    file.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello");
    assert!(path.exists(), "the file stays until the caller removes it");
}

#[test]
fn temp_names_are_unique_within_the_same_second() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = std::collections::HashSet::new();
    for _ in 0..50 {
        let (_, p) = create_temp_file(dir.path(), "x").unwrap();
        assert!(names.insert(p));
        assert!(names.insert(create_temp_folder(dir.path(), "x").unwrap()));
    }
}

#[test]
fn a_temp_folder_is_created_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let folder = create_temp_folder(dir.path(), "restore-").unwrap();
    assert!(folder.is_dir());
    let name = folder.file_name().unwrap().to_str().unwrap();
    assert!(
        stamp_after(name, "restore-")
            .bytes()
            .all(|b| b.is_ascii_digit())
    );
    fs::remove_dir(&folder).unwrap();
}

#[test]
fn an_empty_dir_means_the_system_temp_folder() {
    let (_, path) = create_temp_file("".as_ref(), "dkv-cask-helper-test-").unwrap();
    assert_eq!(path.parent().unwrap(), std::env::temp_dir());
    fs::remove_file(path).unwrap();
    let folder = create_temp_folder("".as_ref(), "dkv-cask-helper-test-").unwrap();
    assert_eq!(folder.parent().unwrap(), std::env::temp_dir());
    fs::remove_dir(folder).unwrap();
}

#[test]
fn creating_in_a_missing_folder_is_a_typed_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    assert!(matches!(
        create_temp_file(&missing, "p"),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        create_temp_folder(&missing, "p"),
        Err(Error::Io { .. })
    ));
}

#[test]
fn rename_folder_replaces_the_destination_with_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::create_dir_all(src.join("inner")).unwrap();
    fs::write(src.join("inner/new"), b"new").unwrap();
    fs::create_dir_all(dst.join("old-dir")).unwrap();
    fs::write(dst.join("old"), b"old").unwrap();
    rename_folder(&src, &dst).unwrap();
    assert!(!src.exists());
    assert_eq!(fs::read(dst.join("inner/new")).unwrap(), b"new");
    assert!(!dst.join("old").exists() && !dst.join("old-dir").exists());
}

#[test]
fn rename_folder_onto_a_missing_destination_just_renames() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    rename_folder(&src, &dir.path().join("dst")).unwrap();
    assert!(dir.path().join("dst").is_dir());
}

#[test]
fn rename_folder_replaces_a_file_at_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(dir.path().join("dst"), b"file").unwrap();
    rename_folder(&src, &dir.path().join("dst")).unwrap();
    assert!(dir.path().join("dst").is_dir());
}

#[test]
fn rename_folder_from_a_missing_source_is_a_typed_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let err = rename_folder(&dir.path().join("nope"), &dir.path().join("dst")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("nope"), "{err}");
}
