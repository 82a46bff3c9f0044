//! DKV's temp-file and folder helpers: names made of a prefix and a
//! timestamp plus a random suffix, and a folder rename that replaces its
//! destination. Used by backup, restore and snapshot staging.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, Result};
use crate::log::{FileSystem, StdFileSystem, remove_dir_all, sync_dir};

/// `YYYYMMDDhhmmss` in UTC (DKV formats local time the same way).
pub(crate) fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn dir_or_temp(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        std::env::temp_dir()
    } else {
        dir.to_path_buf()
    }
}

/// Creates a new file in `dir` (the system temp folder when empty) named
/// `prefix` + timestamp + a random suffix, open for reading and writing.
/// The file stays on disk; the caller removes it.
pub fn create_temp_file(dir: &Path, prefix: &str) -> Result<(File, PathBuf)> {
    let dir = dir_or_temp(dir);
    let named = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}", timestamp()))
        .tempfile_in(&dir)
        .context(|| format!("create a temp file in {}", dir.display()))?;
    let (file, path) = named
        .keep()
        .map_err(|e| e.error)
        .context(|| format!("keep a temp file in {}", dir.display()))?;
    Ok((file, path))
}

/// Creates a new folder in `dir` (the system temp folder when empty) named
/// `prefix` + timestamp + a random suffix, and returns its path. The folder
/// stays on disk; the caller removes it.
pub fn create_temp_folder(dir: &Path, prefix: &str) -> Result<PathBuf> {
    create_temp_folder_with(&StdFileSystem, dir, prefix)
}

/// [`create_temp_folder`] through the file system `fs`.
pub(crate) fn create_temp_folder_with(
    fs: &dyn FileSystem,
    dir: &Path,
    prefix: &str,
) -> Result<PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    let dir = dir_or_temp(dir);
    let stamp = timestamp();
    let mut attempt = 0u32;
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt);
        let suffix: String = (0..6)
            .map(|i| {
                let n = (h.finish() >> (i * 6)) as usize % 36;
                char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[n])
            })
            .collect();
        let path = dir.join(format!("{prefix}{stamp}{suffix}"));
        match fs.create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 64 => attempt += 1,
            Err(e) => {
                return Err(crate::Error::io(
                    format!("create a temp folder in {}", dir.display()),
                    e,
                ));
            }
        }
    }
}

/// Moves `src` onto `dst`: removes `dst` (file or folder, missing is fine),
/// renames `src` to `dst`, and syncs the parent folders so the move is
/// durable. Like DKV's, it is not atomic: a crash between the removal and the
/// rename leaves nothing at `dst`.
pub fn rename_folder(src: &Path, dst: &Path) -> Result<()> {
    rename_folder_with(&StdFileSystem, src, dst)
}

/// [`rename_folder`] through the file system `fs`.
pub(crate) fn rename_folder_with(fs: &dyn FileSystem, src: &Path, dst: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => {
            remove_dir_all(fs, dst).context(|| format!("remove {}", dst.display()))?
        }
        Ok(_) => fs
            .remove_file(dst)
            .context(|| format!("remove {}", dst.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(crate::Error::io(format!("stat {}", dst.display()), e)),
    }
    fs.rename(src, dst)
        .context(|| format!("rename {} to {}", src.display(), dst.display()))?;
    for parent in [dst.parent(), src.parent()].into_iter().flatten() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        sync_dir(parent, fs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
    }

    #[test]
    fn timestamp_has_fourteen_digits() {
        let t = timestamp();
        assert_eq!(t.len(), 14);
        assert!(t.bytes().all(|b| b.is_ascii_digit()));
    }
}
