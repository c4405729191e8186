//! Where results (the MP4 and its thumbnail) live. Every process of a deployment, the API and each
//! worker, must see the same store: [`Folder`] is a folder on a volume they share (a local disk
//! on one machine; NFS, a ReadWriteMany volume, … on several). An object store (S3) fits behind
//! [`ResultStore`] the same way: staged files uploaded under the job's key.
//!
//! A worker stages its result under names of its own attempt, and publishes it (an atomic rename
//! here) only after confirming its lease: a worker that lost its job never replaces the result of
//! the one that took it over, and readers never see half a file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::store::Lease;

/// Where a job's files live; `id` has been checked to be a job id.
pub fn video_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.mp4"))
}

pub fn thumbnail_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.png"))
}

/// The extensions an uploaded input video is stored with: the formats the library's readers
/// take from one file.
pub const INPUT_EXTENSIONS: &[&str] = &["mp4", "gif", "npy"];

/// Where the input video of a video-to-video job is stored, in the format `ext`.
pub fn input_path(dir: &Path, id: &str, ext: &str) -> PathBuf {
    dir.join(format!("{id}.input.{ext}"))
}

/// The stored input video of job `id`, if it has one.
pub fn find_input(dir: &Path, id: &str) -> Option<PathBuf> {
    INPUT_EXTENSIONS.iter().map(|ext| input_path(dir, id, ext)).find(|p| p.is_file())
}

/// Removes what a run of job `id` wrote (its input stays with the job).
pub fn remove_outputs(dir: &Path, id: &str) {
    for path in [video_path(dir, id), thumbnail_path(dir, id)] {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes every file of job `id`: its outputs and its input video.
pub fn remove_files(dir: &Path, id: &str) {
    remove_outputs(dir, id);
    for ext in INPUT_EXTENSIONS {
        let _ = std::fs::remove_file(input_path(dir, id, ext));
    }
}

/// A result written under the names of one attempt, not yet the job's. Removed when dropped
/// unpublished.
#[derive(Debug)]
pub struct StagedResult {
    pub video: PathBuf,
    pub thumbnail: PathBuf,
}

/// The prefix of staged names (hidden files beside the results).
const STAGED_PREFIX: &str = ".staged.";

impl StagedResult {
    pub fn new(dir: &Path, lease: &Lease) -> Self {
        // Worker names come from host names and numbers; anything else is kept out of the path.
        let worker: String =
            lease.worker.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let stem = format!("{STAGED_PREFIX}{}.a{}.{worker}", lease.id, lease.attempt);
        Self { video: dir.join(format!("{stem}.mp4")), thumbnail: dir.join(format!("{stem}.png")) }
    }
}

impl Drop for StagedResult {
    fn drop(&mut self) {
        for path in [&self.video, &self.thumbnail] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The results of jobs, by job id.
pub trait ResultStore: Send + Sync {
    /// Makes `staged` the result of job `id`, whole, replacing what was there.
    fn publish(&self, staged: StagedResult, id: &str) -> Result<()>;
    /// Forgets the result of job `id` (nothing when there is none).
    fn remove(&self, id: &str);
}

/// Results as files in one folder: `{id}.mp4` and `{id}.png`.
pub struct Folder {
    pub dir: PathBuf,
}

impl Folder {
    /// Removes what workers (or uploads) that died left staged or half written more than `age`
    /// ago.
    pub fn remove_stale(&self, age: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let stale = entry.file_name().to_str().is_some_and(is_work_in_progress)
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| SystemTime::now().duration_since(t).map_or(age.is_zero(), |d| d >= age));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether a file of the videos folder is one being written: a staged result, the encoder's
/// partial file beside it (`..staged.….mp4.partial-PID-…`), an upload or input being stored.
pub fn is_work_in_progress(name: &str) -> bool {
    name.starts_with('.') && (name.contains(STAGED_PREFIX) || name.contains(".partial") || name.contains(".upload."))
}

impl ResultStore for Folder {
    fn publish(&self, staged: StagedResult, id: &str) -> Result<()> {
        // The thumbnail first: a reader that finds the video finds its thumbnail.
        std::fs::rename(&staged.thumbnail, thumbnail_path(&self.dir, id)).context("publishing the thumbnail")?;
        std::fs::rename(&staged.video, video_path(&self.dir, id)).context("publishing the video")?;
        Ok(())
    }

    fn remove(&self, id: &str) {
        remove_files(&self.dir, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_per_attempt_and_vanish_unpublished() -> Result<()> {
        let dir = tempfile::TempDir::new()?;
        let folder = Folder { dir: dir.path().to_path_buf() };
        let lease = |attempt| Lease { id: "video_1".into(), worker: "host/../x-1-w0".into(), attempt };
        let (a, b) = (StagedResult::new(dir.path(), &lease(1)), StagedResult::new(dir.path(), &lease(2)));
        assert_ne!(a.video, b.video);
        assert_eq!(a.video.parent(), Some(dir.path()), "a worker name cannot leave the folder");
        for (staged, bytes) in [(&a, b"one"), (&b, b"two")] {
            std::fs::write(&staged.video, bytes)?;
            std::fs::write(&staged.thumbnail, bytes)?;
        }
        folder.publish(b, "video_1")?;
        assert_eq!(std::fs::read(video_path(dir.path(), "video_1"))?, b"two");
        drop(a);
        let left: Vec<_> = std::fs::read_dir(dir.path())?.flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 2, "only the published files stay: {left:?}");
        folder.remove("video_1");
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }
}
