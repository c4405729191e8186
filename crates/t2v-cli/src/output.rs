//! Where each video goes: output names and formats, decided and checked before any model work,
//! and the publishing of a video together with its settings.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use t2v::video::{self, EncodeOptions, Frames, Staged, VideoFormat};

use crate::settings::settings_path;

/// Where generated videos go when no output is given.
pub const DEFAULT_FOLDER: &str = "outputs";

/// One file (or PNG folder) to write, and the settings file beside it.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub format: VideoFormat,
    pub settings: PathBuf,
}

/// The targets of every video: `outputs` and `formats` as given, video `index` of `total`
/// (numbered when there are several), seeds and prompts naming the defaults in `outputs/`.
pub struct Planner<'a> {
    pub outputs: &'a [PathBuf],
    pub formats: &'a [VideoFormat],
    pub overwrite: bool,
    taken: HashSet<PathBuf>,
}

impl<'a> Planner<'a> {
    pub fn new(outputs: &'a [PathBuf], formats: &'a [VideoFormat], overwrite: bool) -> Result<Self> {
        if outputs.len() > 1 && !formats.is_empty() {
            bail!("give either several --output paths (each format from its extension) or one --output with several --format values, not both");
        }
        if outputs.is_empty() {
            std::fs::create_dir_all(DEFAULT_FOLDER).with_context(|| format!("creating {DEFAULT_FOLDER}/"))?;
        }
        Ok(Self { outputs, formats, overwrite, taken: HashSet::new() })
    }

    /// The targets of video `index` of `total`, named after `prompt` and `seed` when no output was given.
    pub fn plan(&mut self, prompt: &str, seed: u64, index: usize, total: usize) -> Result<Vec<Target>> {
        let mut targets = Vec::new();
        if self.outputs.is_empty() {
            let formats = if self.formats.is_empty() { &[VideoFormat::Mp4][..] } else { self.formats };
            let stem = default_stem(prompt, seed);
            for n in 0.. {
                let base = if n == 0 { stem.clone() } else { format!("{stem}-{n}") };
                let candidates: Vec<Target> = formats
                    .iter()
                    .map(|&f| target(Path::new(DEFAULT_FOLDER).join(with_extension(&base, f)), f))
                    .collect();
                let free = candidates.iter().all(|t| {
                    !t.path.exists()
                        && !t.settings.exists()
                        && !self.taken.contains(&t.path)
                        && !self.taken.contains(&t.settings)
                });
                if free {
                    targets = candidates;
                    break;
                }
                if n > 100_000 {
                    bail!("no free name in {DEFAULT_FOLDER}/: give --output");
                }
            }
        } else if self.formats.is_empty() {
            for path in self.outputs {
                targets.push(target(numbered(path, index, total), VideoFormat::from_path(path)?));
            }
        } else {
            let path = &self.outputs[0];
            let named = named_format(path);
            if let Some(f) = named {
                if !self.formats.contains(&f) {
                    bail!(
                        "{} names a .{} file, but --format asks for {}: make them agree",
                        path.display(),
                        f.extension(),
                        self.formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")
                    );
                }
            }
            let base = match named {
                Some(_) => path.with_extension("").to_string_lossy().into_owned(),
                None => path.to_string_lossy().trim_end_matches('/').to_string(),
            };
            for &format in self.formats {
                let path = if named == Some(format) || (self.formats.len() == 1 && named.is_none()) {
                    path.clone()
                } else {
                    PathBuf::from(with_extension(&base, format))
                };
                targets.push(target(numbered(&path, index, total), format));
            }
        }
        for t in &targets {
            // Temporaries that killed runs left in this folder go before this run writes there.
            video::remove_stale_partials(parent_of(&t.path));
            check_output_path(&t.path, Some(t.format), self.overwrite)?;
            check_output_path(&t.settings, None, self.overwrite)?;
            for p in [&t.path, &t.settings] {
                if !self.taken.insert(p.clone()) {
                    bail!(
                        "two outputs of this run would both be written to {}: give each video its own --output",
                        p.display()
                    );
                }
            }
        }
        Ok(targets)
    }
}

fn target(path: PathBuf, format: VideoFormat) -> Target {
    Target { settings: settings_path(&path), path, format }
}

/// The format a path's extension names, if it names one.
fn named_format(path: &Path) -> Option<VideoFormat> {
    let ext = path.extension()?.to_str()?;
    match VideoFormat::from_path(Path::new(&format!("x.{ext}"))) {
        Ok(f) if f != VideoFormat::PngFrames => Some(f),
        _ => None,
    }
}

fn with_extension(base: &str, format: VideoFormat) -> String {
    match format.extension() {
        "" => base.to_string(),
        ext => format!("{base}.{ext}"),
    }
}

/// `path` with `-N` added to its stem when a run writes several videos.
fn numbered(path: &Path, index: usize, total: usize) -> PathBuf {
    if total == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "video".into());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{}.{}", index + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", index + 1),
    };
    path.with_file_name(name)
}

/// `a-corgi-surfing-7`: the prompt's first words and the seed.
fn default_stem(prompt: &str, seed: u64) -> String {
    let slug: String = prompt
        .chars()
        .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .take(8)
        .collect::<Vec<_>>()
        .join("-");
    let slug = if slug.is_empty() { "video".to_string() } else { slug.chars().take(60).collect() };
    format!("{slug}-{seed}")
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What publishing `path` (a video of `format`, or a settings file for `None`) would refuse after
/// the whole generation, refused now: a missing or unwritable folder, an existing path without
/// `overwrite`, a folder where a file goes (or the reverse), a folder holding other files.
fn check_output_path(path: &Path, format: Option<VideoFormat>, overwrite: bool) -> Result<()> {
    let parent = parent_of(path);
    if !parent.is_dir() {
        bail!("the output folder {} does not exist: create it, or choose another --output", parent.display());
    }
    if path.exists() && !overwrite {
        bail!("{} exists: pass --overwrite to replace it, or choose another --output", path.display());
    }
    match format {
        Some(VideoFormat::PngFrames) => {
            video::check_replaceable_dir(path)?;
        }
        _ if path.is_dir() => {
            bail!("{} is a folder: give a file name for this output, or choose another --output", path.display())
        }
        _ => {}
    }
    // The output is written beside its final name, then renamed: the folder must take new files.
    tempfile::Builder::new()
        .prefix(".t2v-write-check-")
        .tempfile_in(parent)
        .with_context(|| format!("the output folder {} cannot be written to", parent.display()))?;
    Ok(())
}

/// Writes every target of one video: each file and its settings are written in full under
/// temporary names, then published together; an existing path is replaced only with `overwrite`,
/// checked at the moment of publishing.
///
/// The two renames cannot be one, so the order keeps every moment consistent: with `overwrite`
/// the old settings file is first moved aside, then the video renamed, then the settings. A
/// process killed in between leaves a video without its settings file (an MP4 carries them
/// inside too), never a new video beside an old video's settings.
pub fn publish(
    targets: &[Target],
    clip: &Frames,
    encode: &EncodeOptions,
    settings_json: &str,
    overwrite: bool,
) -> Result<()> {
    let mut staged = Vec::with_capacity(targets.len());
    for t in targets {
        staged.push(
            video::stage_video(clip, t.format, &t.path, encode)
                .with_context(|| format!("writing {}", t.path.display()))?,
        );
    }
    publish_staged(targets, staged, settings_json, overwrite)
}

/// [`publish`] of videos already written under temporary names (`staged[i]` is `targets[i]`'s,
/// as [`video::stage_mp4`] leaves a streamed MP4).
pub fn publish_staged(targets: &[Target], staged: Vec<Staged>, settings_json: &str, overwrite: bool) -> Result<()> {
    for (t, staged_video) in targets.iter().zip(staged) {
        let staged_settings = video::stage_text(&t.settings, settings_json)
            .with_context(|| format!("writing {}", t.settings.display()))?;
        let old_settings = if overwrite {
            video::SetAside::file(&t.settings).with_context(|| format!("replacing {}", t.settings.display()))?
        } else {
            None
        };
        if let Err(e) = staged_video.publish(overwrite) {
            if let Some(old) = old_settings {
                old.restore();
            }
            return Err(explain_exists(e)).with_context(|| format!("writing {}", t.path.display()));
        }
        fault_point("T2V_TEST_DIE_BETWEEN_RENAMES");
        if let Err(e) = staged_settings.publish(overwrite) {
            // The settings could not join the video: take the video back rather than leave it without them.
            let _ = if t.format == VideoFormat::PngFrames {
                std::fs::remove_dir_all(&t.path)
            } else {
                std::fs::remove_file(&t.path)
            };
            return Err(explain_exists(e)).with_context(|| format!("writing {}", t.settings.display()));
        }
        if let Some(old) = old_settings {
            old.discard();
        }
    }
    Ok(())
}

/// Test builds only: dies at once (no destructors, as under SIGKILL) when the variable `name` is
/// set, so that a test can stop the process between the two renames of [`publish`].
fn fault_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os(name).is_some() {
        std::process::abort();
    }
}

fn explain_exists(e: t2v::Error) -> anyhow::Error {
    match e {
        t2v::Error::OutputExists { path } => anyhow::anyhow!(
            "{} appeared while this video was being made: it was left as it is; pass --overwrite to replace it, or choose another --output",
            path.display()
        ),
        e => e.into(),
    }
}
