//! Atomic output: write to a hidden sibling, rename at the end, remove it on any error.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `DIR/.NAME.<tag>-PID-N` next to `path` (same folder, so the final rename is atomic).
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "output path {} does not name a file or folder",
            path.display()
        ))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent.join(format!(
        ".{}.{tag}-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Removes the temporary path on drop unless disarmed.
struct TempGuard {
    path: PathBuf,
    dir: bool,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = if self.dir {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
        }
    }
}

/// Writes a file atomically: `write` fills a buffered temporary file that is synced and renamed
/// onto `path`. Errors name `path`.
pub(crate) fn write_file(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    let tmp = sibling(path, "partial")?;
    let file = File::create(&tmp).map_err(|e| Error::io(path, e))?;
    let mut guard = TempGuard {
        path: tmp.clone(),
        dir: false,
        armed: true,
    };
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write(&mut w).map_err(|e| Error::io(path, e))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| {
        if path.is_dir() {
            Error::InvalidArgument(format!(
                "{} is a folder: give a file name for this format",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    guard.armed = false;
    Ok(())
}

/// True when `dir` holds only files named like `frame_NNNN.png` (what we write), or nothing.
fn is_our_frame_folder(dir: &Path) -> io::Result<bool> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ok = entry.file_type()?.is_file()
            && name
                .strip_prefix("frame_")
                .and_then(|r| r.strip_suffix(".png"))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_replaceable_dir(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
        Ok(m) if m.is_dir() => {
            if is_our_frame_folder(path).map_err(|e| Error::io(path, e))? {
                Ok(true)
            } else {
                Err(Error::InvalidArgument(format!(
                    "{} already exists and holds files other than frame_NNNN.png: \
                     remove it or choose another output folder",
                    path.display()
                )))
            }
        }
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{} already exists and is not a folder: choose another output path for PNG frames",
            path.display()
        ))),
    }
}

/// Writes a folder atomically: `write` fills a temporary sibling folder that is then renamed
/// onto `path`. An existing `path` is replaced only if it holds nothing but `frame_NNNN.png`.
pub(crate) fn write_dir(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable_dir(path)?;
    let tmp = sibling(path, "partial")?;
    fs::create_dir(&tmp).map_err(|e| Error::io(path, e))?;
    let mut guard = TempGuard {
        path: tmp.clone(),
        dir: true,
        armed: true,
    };
    write(&tmp)?;
    if check_replaceable_dir(path)? {
        // Move the old folder aside, put the new one in place, then delete the old one.
        let old = sibling(path, "old")?;
        fs::rename(path, &old).map_err(|e| Error::io(path, e))?;
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::rename(&old, path);
            return Err(Error::io(path, e));
        }
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    }
    guard.armed = false;
    Ok(())
}
