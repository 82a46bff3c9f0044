//! DKV's `Backupable`: online backups made of hard links to sealed segments
//! plus a checksummed manifest, verified restores that swap the store's
//! folder crash-safely, and the open-time step that finishes or undoes a
//! swap a crash interrupted. Must not write to a live segment.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Progress;
use crate::error::{Error, IoContext, Result};
use crate::helpers::{create_temp_folder_with, rename_folder_with};
use crate::log::{FileSystem, SegmentId, sync_dir};
use crate::store::{Inner, Store};

/// The manifest's file name inside a backup folder. A folder without it is
/// an unfinished backup.
pub const BACKUP_MANIFEST: &str = "BACKUP-MANIFEST";

/// Marks a staged restore as complete (all files in place and synced).
const RESTORE_COMPLETE: &str = "RESTORE-COMPLETE";

/// First line of a manifest.
const MANIFEST_MAGIC: &str = "dkv-cask-backup";
/// Version of the backup manifest's text format.
const MANIFEST_VERSION: u16 = 1;

/// DKV's `Backupable`.
pub trait Backupable {
    /// Backs the whole store up into the folder `path` (created if missing;
    /// its parent must exist). Writers keep going meanwhile.
    fn backup_to(&self, path: &Path) -> Result<BackupInfo>;

    /// Verifies the backup in the folder `path`, replaces this store's
    /// contents with it, and returns the reopened store. On an error before
    /// the swap this handle stays open and unchanged; from the swap on it
    /// is closed, and a crash leaves the old store or the restored one.
    fn restore_from(&self, path: &Path) -> Result<Store>;
}

/// What a backup holds: its manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// The change number the backup stands at: every record up to it.
    pub change_number: u64,
    /// The master change number a replica had applied (0 otherwise).
    pub applied_change_number: u64,
    /// When the backup was taken, in Unix seconds.
    pub created_unix: u64,
    /// Every segment file: name, length and CRC-32.
    pub files: Vec<BackupFile>,
    /// Files hard-linked (the rest were copied).
    pub linked: usize,
    /// Wall time the backup took (zero when read from a manifest).
    pub duration: Duration,
}

/// One file of a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupFile {
    /// File name inside the backup folder.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32 of the whole file.
    pub crc: u32,
}

impl BackupInfo {
    /// Total bytes of the backup's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    fn encode(&self) -> String {
        let mut s = format!(
            "{MANIFEST_MAGIC} {MANIFEST_VERSION}\nchange-number {}\napplied-change-number {}\ncreated-unix {}\n",
            self.change_number, self.applied_change_number, self.created_unix
        );
        for f in &self.files {
            s.push_str(&format!("file {} {} {:08x}\n", f.name, f.len, f.crc));
        }
        let crc = crate::format::crc32(s.as_bytes());
        s.push_str(&format!("crc32 {crc:08x}\n"));
        s
    }

    fn decode(text: &str, path: &Path) -> Result<BackupInfo> {
        let bad = |reason: &str| Error::InvalidBackup {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| bad("manifest is truncated"))?;
        let (body, last) = text.split_at(body_end);
        let crc = last
            .trim()
            .strip_prefix("crc32 ")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("manifest has no checksum line"))?;
        if crate::format::crc32(body.as_bytes()) != crc {
            return Err(bad("manifest checksum does not match"));
        }
        let mut lines = body.lines();
        let version = lines
            .next()
            .and_then(|l| l.strip_prefix(MANIFEST_MAGIC))
            .and_then(|v| v.trim().parse::<u16>().ok())
            .ok_or_else(|| bad("not a dkv-cask backup manifest"))?;
        if version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let mut field = |name: &str| -> Result<u64> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad(&format!("manifest lacks {name}")))
        };
        let change_number = field("change-number")?;
        let applied_change_number = field("applied-change-number")?;
        let created_unix = field("created-unix")?;
        let mut files = Vec::new();
        for line in lines {
            let mut parts = line.split(' ');
            let (Some("file"), Some(name), Some(len), Some(crc), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(bad(&format!("unreadable manifest line {line:?}")));
            };
            if SegmentId::parse_file_name(name).is_none() {
                return Err(bad(&format!("manifest names a foreign file {name:?}")));
            }
            files.push(BackupFile {
                name: name.to_string(),
                len: len.parse().map_err(|_| bad("unreadable file length"))?,
                crc: u32::from_str_radix(crc, 16).map_err(|_| bad("unreadable file checksum"))?,
            });
        }
        Ok(BackupInfo {
            change_number,
            applied_change_number,
            created_unix,
            files,
            linked: 0,
            duration: Duration::ZERO,
        })
    }
}

/// Holds the store's global-mutation flag for a backup, restore or snapshot
/// load, and clears it when dropped.
pub(crate) struct GlobalMutation<'a>(&'a Inner);

impl<'a> GlobalMutation<'a> {
    /// Takes the flag, or fails at once with DKV's error.
    pub(crate) fn take(inner: &'a Inner) -> Result<Self> {
        inner
            .global_mutation
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| Error::GlobalMutationInProgress)?;
        Ok(GlobalMutation(inner))
    }
}

impl Drop for GlobalMutation<'_> {
    fn drop(&mut self) {
        self.0.global_mutation.store(false, Ordering::Release);
    }
}

/// DKV's path rules for a backup folder: not blank; an existing path must
/// be a folder; a missing one needs an existing parent.
fn check_backup_path(path: &Path, store_dir: &Path) -> Result<()> {
    if path.as_os_str().to_string_lossy().trim().is_empty() {
        return Err(Error::InvalidPath {
            path: path.to_path_buf(),
            reason: "valid path must be provided".into(),
        });
    }
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidPath {
                path: path.to_path_buf(),
                reason: "require a folder for a backup".into(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = parent_of(path);
            fs::metadata(&parent)
                .context(|| format!("find the parent folder {}", parent.display()))?;
        }
        Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
    }
    if same_folder(path, store_dir) {
        return Err(Error::InvalidPath {
            path: path.to_path_buf(),
            reason: "a backup cannot go into the store's own folder".into(),
        });
    }
    Ok(())
}

/// DKV's path rules for a restore: the path must be an existing folder.
fn check_restore_path(path: &Path) -> Result<()> {
    if path.as_os_str().to_string_lossy().trim().is_empty() {
        return Err(Error::InvalidPath {
            path: path.to_path_buf(),
            reason: "valid path must be provided".into(),
        });
    }
    let m = fs::metadata(path).context(|| format!("find the backup {}", path.display()))?;
    if !m.is_dir() {
        return Err(Error::InvalidPath {
            path: path.to_path_buf(),
            reason: "require a folder for a restore".into(),
        });
    }
    Ok(())
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Hard-links `src` to `dst`, or copies it (and syncs the copy) where a
/// link is impossible. Returns whether it linked.
fn link_or_copy(fs: &dyn FileSystem, src: &Path, dst: &Path) -> Result<bool> {
    match fs.hard_link(src, dst) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs.remove_file(dst)
                .context(|| format!("remove {}", dst.display()))?;
            link_or_copy(fs, src, dst)
        }
        Err(_) => {
            copy_synced(fs, src, dst)?;
            Ok(false)
        }
    }
}

/// Copies `src` to `dst` and syncs the copy.
fn copy_synced(fs: &dyn FileSystem, src: &Path, dst: &Path) -> Result<()> {
    crate::log::copy_synced(fs, src, dst)
        .context(|| format!("copy {} to {}", src.display(), dst.display()))
}

/// Writes `contents` to `dir/name` through a synced temp file and a rename,
/// then syncs the folder.
fn write_file_atomically(
    fs: &dyn FileSystem,
    dir: &Path,
    name: &str,
    contents: &[u8],
) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    crate::log::write_file(fs, &tmp, contents)
        .and_then(|f| fs.sync_all(&f))
        .and_then(|()| fs.rename(&tmp, &path))
        .context(|| format!("write {}", path.display()))?;
    sync_dir(dir, fs)
}

/// Reads and checks the manifest and every file of the backup in `path`:
/// sizes and CRC-32s. Touches nothing.
pub fn verify_backup(path: &Path) -> Result<BackupInfo> {
    verify_backup_with_progress(path, &mut |_, _| {})
}

/// [`verify_backup`], calling `progress(bytes checked, bytes in all)` after
/// each file (for a progress bar).
pub fn verify_backup_with_progress(path: &Path, progress: Progress<'_>) -> Result<BackupInfo> {
    check_restore_path(path)?;
    let manifest = path.join(BACKUP_MANIFEST);
    let text = match fs::read(&manifest) {
        Ok(b) => String::from_utf8(b).map_err(|_| Error::InvalidBackup {
            path: manifest.clone(),
            reason: "manifest is not text".into(),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::InvalidBackup {
                path: path.to_path_buf(),
                reason: format!("no {BACKUP_MANIFEST}: the backup is unfinished"),
            });
        }
        Err(e) => return Err(Error::io(format!("read {}", manifest.display()), e)),
    };
    let info = BackupInfo::decode(&text, &manifest)?;
    let total = info.bytes();
    let mut done = 0;
    for f in &info.files {
        let file = path.join(&f.name);
        let bytes = fs::read(&file).map_err(|e| Error::InvalidBackup {
            path: file.clone(),
            reason: format!("cannot read a file the manifest lists: {e}"),
        })?;
        if bytes.len() as u64 != f.len {
            return Err(Error::InvalidBackup {
                path: file,
                reason: format!("{} bytes, the manifest says {}", bytes.len(), f.len),
            });
        }
        if crate::format::crc32(&bytes) != f.crc {
            return Err(Error::InvalidBackup {
                path: file,
                reason: "checksum does not match the manifest".into(),
            });
        }
        done += f.len;
        progress(done, total);
    }
    Ok(info)
}

impl Backupable for Store {
    fn backup_to(&self, path: &Path) -> Result<BackupInfo> {
        self.backup_with_progress(path, &mut |_, _| {})
    }

    fn restore_from(&self, path: &Path) -> Result<Store> {
        restore(self, path, &mut |_| true, &mut |_, _| {})
    }
}

impl Store {
    /// [`Backupable::backup_to`], calling `progress(bytes done, bytes in
    /// all)` after each segment is checksummed and linked (for a progress
    /// bar).
    pub fn backup_with_progress(&self, path: &Path, progress: Progress<'_>) -> Result<BackupInfo> {
        let started = Instant::now();
        let inner = &self.inner;
        let fs = &*inner.fs;
        inner.check_open()?;
        check_backup_path(path, &inner.dir)?;
        let _flag = GlobalMutation::take(inner)?;
        if !path.exists() {
            fs.create_dir(path)
                .context(|| format!("create {}", path.display()))?;
            sync_dir(&parent_of(path), fs)?;
        }
        // An earlier backup in the folder: unmark it first, so that a crash
        // from here on leaves a folder recognisably unfinished.
        let old_manifest = path.join(BACKUP_MANIFEST);
        if old_manifest.exists() {
            fs.remove_file(&old_manifest)
                .context(|| format!("remove {}", old_manifest.display()))?;
            sync_dir(path, fs)?;
        }
        let (change_number, sealed) = inner.seal_active()?;
        let mut files = Vec::with_capacity(sealed.len());
        let mut linked = 0;
        let mut keep = std::collections::HashSet::new();
        let total: u64 = sealed
            .iter()
            .map(|(_, _, r)| r.sealed_bytes().map_or(0, |b| b.len() as u64))
            .sum();
        let mut done = 0;
        for (id, src, reader) in &sealed {
            let name = id.file_name();
            let (len, crc) = inner.sealed_crc(*id, reader)?;
            if link_or_copy(fs, src, &path.join(&name))? {
                linked += 1;
            }
            keep.insert(name.clone());
            files.push(BackupFile { name, len, crc });
            done += len;
            progress(done, total);
        }
        // Segment files of an older backup that this one does not hold, and
        // unfinished copies.
        for entry in fs::read_dir(path).context(|| format!("list {}", path.display()))? {
            let entry = entry.context(|| format!("list {}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = SegmentId::parse_file_name(&name).is_some() && !keep.contains(&name);
            // A copy a failed backup left half written.
            let unfinished = name.ends_with(crate::log::COPYING_SUFFIX);
            if stale || unfinished {
                fs.remove_file(&entry.path())
                    .context(|| format!("remove {name}"))?;
            }
        }
        sync_dir(path, fs)?;
        let info = BackupInfo {
            change_number,
            applied_change_number: inner.applied.load(Ordering::Acquire),
            created_unix: now_unix(),
            files,
            linked,
            duration: Duration::ZERO,
        };
        write_file_atomically(fs, path, BACKUP_MANIFEST, info.encode().as_bytes())?;
        Ok(BackupInfo {
            duration: started.elapsed(),
            ..info
        })
    }

    /// [`Backupable::restore_from`], calling `progress(bytes checked, bytes
    /// in all)` while it verifies the backup (the long part: linking the
    /// files is quick).
    pub fn restore_with_progress(&self, path: &Path, progress: Progress<'_>) -> Result<Store> {
        restore(self, path, &mut |_| true, progress)
    }
}

/// The steps of a restore, for crash tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreStep {
    /// The backup was verified; nothing was touched.
    Verified,
    /// The files are staged beside the store, not yet marked complete.
    Staged,
    /// The staging folder is marked complete.
    MarkedComplete,
    /// The live folder was moved aside; the store's path is empty.
    MovedAside,
    /// The staged folder is in place; the old one still exists aside.
    SwappedIn,
}

/// A restore that calls `hook` after each step and stops dead (as a crash
/// would) when it returns `false`.
#[doc(hidden)]
pub fn restore_with_hook(
    store: &Store,
    path: &Path,
    hook: &mut dyn FnMut(RestoreStep) -> bool,
) -> Result<Store> {
    restore(store, path, hook, &mut |_, _| {})
}

fn restore(
    store: &Store,
    path: &Path,
    hook: &mut dyn FnMut(RestoreStep) -> bool,
    progress: Progress<'_>,
) -> Result<Store> {
    let inner = &store.inner;
    let fs = &*inner.fs;
    inner.check_open()?;
    check_restore_path(path)?;
    let flag = GlobalMutation::take(inner)?;
    let info = verify_backup_with_progress(path, progress)?;
    let crashed = || Error::InvalidOptions("restore stopped by its test hook".into());
    if !hook(RestoreStep::Verified) {
        return Err(crashed());
    }
    let dir = inner.dir.clone();
    let staging = staging_folder(fs, &dir)?;
    let staged = (|| -> Result<()> {
        for (i, f) in info.files.iter().enumerate() {
            let src = path.join(&f.name);
            let dst = staging.join(&f.name);
            // The newest segment becomes the active one and is appended to:
            // it must not share its inode with the backup.
            if i + 1 == info.files.len() {
                copy_synced(fs, &src, &dst)?;
            } else {
                link_or_copy(fs, &src, &dst)?;
            }
        }
        sync_dir(&staging, fs)
    })();
    if let Err(e) = staged {
        let _ = crate::log::remove_dir_all(fs, &staging);
        return Err(e);
    }
    if !hook(RestoreStep::Staged) {
        return Err(crashed());
    }
    mark_complete(fs, &staging)?;
    if !hook(RestoreStep::MarkedComplete) {
        return Err(crashed());
    }
    // From here on the live store is replaced: close it first.
    let options = inner.options.clone();
    let _ = inner.close_with(false);
    drop(flag);
    if !swap_folders(fs, &dir, &staging, hook)? {
        return Err(crashed());
    }
    Store::open(&dir, options)
}

/// Replaces the folder `dir` with the complete staged folder `staging`:
/// moves `dir` aside, moves `staging` in, keeps what in `dir` was not the
/// store's own, and removes the old folder. A crash at any point is settled
/// by the next open ([`settle_swaps`]). `hook` sees the steps (crash tests);
/// returns `false` when the hook stopped it.
pub(crate) fn swap_folders(
    fs: &dyn FileSystem,
    dir: &Path,
    staging: &Path,
    hook: &mut dyn FnMut(RestoreStep) -> bool,
) -> Result<bool> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = parent_of(dir);
    // An empty folder with a unique name, which the rename replaces.
    let aside = create_temp_folder_with(fs, &parent, &format!("{name}.replaced-"))?;
    fs.rename(dir, &aside)
        .context(|| format!("move {} aside", dir.display()))?;
    sync_dir(&parent, fs)?;
    if !hook(RestoreStep::MovedAside) {
        return Ok(false);
    }
    rename_folder_with(fs, staging, dir)?;
    if !hook(RestoreStep::SwappedIn) {
        return Ok(false);
    }
    carry_over(fs, &aside, dir)?;
    crate::log::remove_dir_all(fs, &aside).context(|| format!("remove {}", aside.display()))?;
    sync_dir(&parent, fs)?;
    Ok(true)
}

/// Whether a file name belongs to the store itself (replaced by a swap).
fn is_store_file(name: &str) -> bool {
    let extension = name.rsplit('.').next().unwrap_or("");
    SegmentId::parse_file_name(name).is_some()
        // Hints, hints being written, and merge output being written: a
        // hint of the replaced store must never describe a restored segment.
        || [crate::log::HINT_EXTENSION, crate::log::MERGING_EXTENSION].contains(&extension)
        || name.ends_with(".hint.tmp")
        || [
            crate::log::LOCK_FILE,
            crate::log::SYNC_FAILED_FILE,
            crate::log::SPARE_FILE,
            crate::KEYDIR_FILE,
            crate::KEYDIR_TMP_FILE,
            RESTORE_COMPLETE,
        ]
        .contains(&name)
}

/// Moves what is not the store's own (a backup folder kept inside the store
/// folder, say) from the replaced folder into the new one, so a swap never
/// deletes it.
fn carry_over(fs: &dyn FileSystem, old: &Path, new: &Path) -> Result<()> {
    let mut moved = false;
    for entry in fs::read_dir(old).context(|| format!("list {}", old.display()))? {
        let entry = entry.context(|| format!("list {}", old.display()))?;
        let name = entry.file_name();
        if is_store_file(&name.to_string_lossy()) || new.join(&name).exists() {
            continue;
        }
        fs.rename(&entry.path(), &new.join(&name))
            .context(|| format!("keep {} across the swap", entry.path().display()))?;
        moved = true;
    }
    if moved {
        sync_dir(new, fs)?;
        sync_dir(old, fs)?;
    }
    Ok(())
}

/// A new, empty staging folder beside the store folder `dir`, named so that
/// [`settle_swaps`] recognises it.
pub(crate) fn staging_folder(fs: &dyn FileSystem, dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidPath {
            path: dir.to_path_buf(),
            reason: "the store folder has no name".into(),
        })?;
    create_temp_folder_with(fs, &parent_of(dir), &format!("{name}.restore-"))
}

/// Marks a staged folder complete: everything in it is in place and synced.
pub(crate) fn mark_complete(fs: &dyn FileSystem, staging: &Path) -> Result<()> {
    write_file_atomically(fs, staging, RESTORE_COMPLETE, b"complete\n")
}

/// Finishes or undoes a folder swap (restore or snapshot load) that a crash
/// interrupted, before the store at `dir` is opened: with the store's
/// folder missing, a complete staged folder is moved in (or else the old
/// folder moved back); with it present, leftovers are removed.
pub(crate) fn settle_swaps(dir: &Path, fs: &dyn FileSystem) -> Result<()> {
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let parent = parent_of(dir);
    let Ok(entries) = fs::read_dir(&parent) else {
        return Ok(());
    };
    let (mut staged, mut aside) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{name}.restore-")) {
            staged.push(entry.path());
        } else if n.starts_with(&format!("{name}.replaced-")) {
            aside.push(entry.path());
        }
    }
    if staged.is_empty() && aside.is_empty() {
        return Ok(());
    }
    staged.sort();
    aside.sort();
    if !dir.exists() {
        let complete = staged
            .iter()
            .rev()
            .find(|s| s.join(RESTORE_COMPLETE).exists());
        if let Some(s) = complete {
            fs.rename(s, dir)
                .context(|| format!("finish moving {} in", s.display()))?;
        } else if let Some(a) = aside.last() {
            fs.rename(a, dir)
                .context(|| format!("move {} back", a.display()))?;
        }
        sync_dir(&parent, fs)?;
    }
    for a in aside.iter().filter(|p| p.exists()) {
        carry_over(fs, a, dir)?;
    }
    for leftover in staged.iter().chain(aside.iter()).filter(|p| p.exists()) {
        crate::log::remove_dir_all(fs, leftover)
            .context(|| format!("remove {}", leftover.display()))?;
    }
    let marker = dir.join(RESTORE_COMPLETE);
    if marker.exists() {
        fs.remove_file(&marker)
            .context(|| format!("remove {}", marker.display()))?;
        sync_dir(dir, fs)?;
    }
    sync_dir(&parent, fs)
}
