//! Outputs appear whole or not at all: each is written to a hidden temporary sibling (a
//! `tempfile`), then published by a rename that, unless asked to replace, refuses an existing path
//! at the moment of the rename itself (no window between a check and the write).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

use crate::error::{Error, Result};

/// Marks a temporary output's name; the process id after it lets a later run tell stale
/// temporaries of dead processes from those of a run in progress.
pub const PARTIAL_TAG: &str = "partial";

/// An output written in full under a temporary name, not yet visible under its own.
/// Dropping it removes the temporary.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    temp: Temp,
}

#[derive(Debug)]
enum Temp {
    File(NamedTempFile),
    Dir(TempDir),
}

impl Staged {
    /// Where the output will appear.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary onto [`Staged::path`]. Without `overwrite` an existing path is
    /// left as it is and an error returned; with it, a file is replaced, and a folder only if it
    /// holds nothing but PNG frames that t2v writes.
    pub fn publish(self, overwrite: bool) -> Result<()> {
        let path = self.path;
        match self.temp {
            Temp::File(file) => {
                if path.is_dir() {
                    return Err(Error::InvalidArgument(format!(
                        "{} is a folder: give a file name for this format",
                        path.display()
                    )));
                }
                let persisted = if overwrite { file.persist(&path) } else { file.persist_noclobber(&path) };
                persisted.map(drop).map_err(|e| exists_or_io(&path, e.error))
            }
            Temp::Dir(dir) => {
                if overwrite && check_replaceable_dir(&path)? {
                    // Move the old folder aside, put the new one in place, then delete the old one.
                    let old = tempfile::Builder::new()
                        .prefix(&hidden_prefix(&path, "old")?)
                        .tempdir_in(parent_of(&path))
                        .map_err(|e| Error::io(&path, e))?;
                    let old_path = old.path().join("frames");
                    fs::rename(&path, &old_path).map_err(|e| Error::io(&path, e))?;
                    if let Err(e) = fs::rename(dir.path(), &path) {
                        let _ = fs::rename(&old_path, &path);
                        return Err(Error::io(&path, e));
                    }
                    let _ = dir.keep();
                    Ok(())
                } else {
                    // Claim the name with an empty folder (this fails if anything holds it), then
                    // rename the finished folder onto it: POSIX replaces an empty folder atomically.
                    fs::create_dir(&path).map_err(|e| exists_or_io(&path, e))?;
                    if let Err(e) = fs::rename(dir.path(), &path) {
                        let _ = fs::remove_dir(&path);
                        return Err(Error::io(&path, e));
                    }
                    let _ = dir.keep();
                    Ok(())
                }
            }
        }
    }
}

/// A file moved out of the way under a hidden name beside it (`.NAME.old-PID-RANDOM`), to be
/// put back or deleted. Publishing a video and its settings file takes two renames; moving the old
/// settings aside first means a process killed between them leaves a video without its settings,
/// never a new video beside the old one's settings.
#[derive(Debug)]
pub struct SetAside {
    path: PathBuf,
    aside: PathBuf,
}

impl SetAside {
    /// Moves the regular file at `path` aside; `None` when nothing is there. Anything other than
    /// a regular file is refused (and left where it is).
    pub fn file(path: &Path) -> Result<Option<SetAside>> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
            Ok(m) if !m.is_file() => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a regular file: it was left as it is; choose another output",
                    path.display()
                )))
            }
            Ok(_) => {}
        }
        // A unique hidden name: created empty by tempfile, then the old file renamed onto it.
        let (_, aside) = tempfile::Builder::new()
            .prefix(&hidden_prefix(path, "old")?)
            .tempfile_in(parent_of(path))
            .map_err(|e| Error::io(path, e))?
            .keep()
            .map_err(|e| Error::io(path, e.error))?;
        if let Err(e) = fs::rename(path, &aside) {
            let _ = fs::remove_file(&aside);
            if e.kind() == io::ErrorKind::NotFound {
                return Ok(None);
            }
            return Err(Error::io(path, e));
        }
        Ok(Some(SetAside { path: path.to_path_buf(), aside }))
    }

    /// Puts the file back where it was, unless something has taken its place meanwhile (then
    /// the old file is deleted: the newcomer wins).
    pub fn restore(self) {
        if fs::hard_link(&self.aside, &self.path).is_err() {
            // Filesystems without hard links: a rename, when the path is still free.
            if !self.path.exists() {
                let _ = fs::rename(&self.aside, &self.path);
            }
        }
        let _ = fs::remove_file(&self.aside);
    }

    /// Deletes the old file for good.
    pub fn discard(self) {
        let _ = fs::remove_file(&self.aside);
    }
}

fn exists_or_io(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::AlreadyExists {
        Error::OutputExists { path: path.to_path_buf() }
    } else {
        Error::io(path, e)
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.NAME.<tag>-PID-`: hidden, named after the output, and tagged with this process.
fn hidden_prefix(path: &Path, tag: &str) -> Result<String> {
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!("output path {} does not name a file or folder", path.display()))
    })?;
    Ok(format!(".{}.{tag}-{}-", name.to_string_lossy(), std::process::id()))
}

/// Writes a file under a temporary name beside `path`: `write` fills it through a buffer; the
/// data is synced to disk before [`Staged::publish`] can make it visible. Errors name `path`.
pub fn stage_file(path: &Path, write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>) -> Result<Staged> {
    let file = tempfile::Builder::new()
        .prefix(&hidden_prefix(path, PARTIAL_TAG)?)
        .tempfile_in(parent_of(path))
        .map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file.as_file());
    write(&mut w).map_err(|e| Error::io(path, e))?;
    w.flush().map_err(|e| Error::io(path, e))?;
    drop(w);
    file.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    Ok(Staged { path: path.to_path_buf(), temp: Temp::File(file) })
}

/// Writes a folder under a temporary name beside `path`: `write` fills it.
pub fn stage_dir(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<Staged> {
    let dir = tempfile::Builder::new()
        .prefix(&hidden_prefix(path, PARTIAL_TAG)?)
        .tempdir_in(parent_of(path))
        .map_err(|e| Error::io(path, e))?;
    write(dir.path())?;
    Ok(Staged { path: path.to_path_buf(), temp: Temp::Dir(dir) })
}

/// True when `dir` holds only files named like `frame_NNNN.png` (what t2v writes), or nothing.
fn is_frame_folder(dir: &Path) -> io::Result<bool> {
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

/// Whether `path` is a PNG frame folder that may be replaced (false: nothing is there); an
/// error when something else is there.
pub fn check_replaceable_dir(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
        Ok(m) if m.is_dir() => {
            if is_frame_folder(path).map_err(|e| Error::io(path, e))? {
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

/// Removes the temporaries in `dir` that processes which no longer exist left behind (killed
/// while writing); those of running processes are left alone. Returns what was removed.
pub fn remove_stale_partials(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = temporary_owner(&name.to_string_lossy()) else { continue };
        if process_exists(pid) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The process id in a temporary's name `.NAME.<tag>-PID-RANDOM`, for the tags this module writes.
pub fn temporary_owner(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    ["partial", "old"].iter().find_map(|tag| {
        let at = name.rfind(&format!(".{tag}-"))?;
        let rest = &name[at + tag.len() + 2..];
        let (pid, random) = rest.split_once('-')?;
        (!random.is_empty() && !random.contains('-')).then_some(())?;
        pid.parse().ok()
    })
}

#[cfg(unix)]
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // Signal 0 checks for the process without signalling it; EPERM means it exists as another user.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

#[cfg(not(unix))]
fn process_exists(_pid: u32) -> bool {
    // Without a cheap liveness check, leave every temporary alone.
    true
}
