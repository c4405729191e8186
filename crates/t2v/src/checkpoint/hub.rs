//! Resolving a model name: a local checkpoint folder, or a Hugging Face repo id (`owner/name`,
//! optionally `owner/name@revision`) looked up in, and downloaded into, the standard Hugging Face
//! cache.
//!
//! The cache is laid out exactly as the hub clients lay it out, so that Python's `huggingface_hub`
//! and t2v share files:
//!
//! ```text
//! $HF_HUB_CACHE/models--owner--name/
//!     blobs/<etag>                          the file contents (sha256 for LFS files, git sha1 otherwise)
//!     refs/main                             the commit that the branch `main` pointed to
//!     snapshots/<commit>/unet/config.json   relative symlink to ../../../blobs/<etag>
//! ```
//!
//! Only the files the pipeline reads are fetched: `model_index.json`, each component's config, the
//! tokenizer files, and for each of text_encoder/unet/vae the weights files that the loader will
//! read ([`select_weights`]).
//!
//! Downloads go through the blocking client of the `hf-hub` crate: one progress bar per file on
//! stderr, and a partial download (`blobs/<etag>.part`) is resumed with an HTTP Range request.
//!
//! One file: resolving, the cache's layout and downloading into it are one protocol (the Hugging Face
//! cache format), and each part needs the others' paths.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::select::{select_weights, WeightsVariant};
use crate::error::{Error, Result};

/// The checkpoint to use when none is named: the model card's.
pub const DEFAULT_MODEL: &str = "damo-vilab/text-to-video-ms-1.7b";

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files every checkpoint needs, as paths inside the repo.
const REQUIRED_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
];

/// Files read when they are there (the tokenizer works without it).
const OPTIONAL_FILES: &[&str] = &["tokenizer/special_tokens_map.json"];

/// Components that have weights.
const WEIGHTED_COMPONENTS: &[&str] = &["text_encoder", "unet", "vae"];

/// Where and how to look models up. [`HubOptions::from_env`] reads the variables that Python's
/// `huggingface_hub` reads; [`resolve_model`] itself reads no environment variable.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub cache (the folder holding `models--owner--name/`).
    pub cache_dir: PathBuf,
    /// Never touch the network: use only what is in the cache.
    pub offline: bool,
    /// Access token for gated or private repos.
    pub token: Option<String>,
    /// Base URL of the Hub (`https://huggingface.co`, or a mirror).
    pub endpoint: String,
    /// The weights to fetch: what the loader reads for this variant, and for a component that lacks
    /// the variant what it reads for [`WeightsVariant::Auto`] (see [`select_files`]).
    pub variant: WeightsVariant,
    /// Show download progress bars (and a line saying what is downloaded) on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// Options with the cache at `cache_dir`, online, anonymous, the public Hub, the weights of
    /// [`WeightsVariant::Auto`], progress shown.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: false,
            token: None,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            variant: WeightsVariant::Auto,
            progress: true,
        }
    }

    /// Options from the environment, with the precedence of Python's `huggingface_hub`:
    ///
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`; `HF_HOME`
    ///   defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - offline: `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) set to 1/true/yes/on;
    /// - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`
    ///   (default `$HF_HOME/token`, written by `hf auth login`); none when
    ///   `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set;
    /// - endpoint: `HF_ENDPOINT`;
    /// - progress: off when `HF_HUB_DISABLE_PROGRESS_BARS` is set.
    pub fn from_env() -> Self {
        let hf_home = env_path("HF_HOME").unwrap_or_else(|| {
            env_path("XDG_CACHE_HOME").unwrap_or_else(|| home_dir().join(".cache")).join("huggingface")
        });
        let cache_dir = env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE");
        let token = if env_true("HF_HUB_DISABLE_IMPLICIT_TOKEN") {
            None
        } else {
            env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
                let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home.join("token"));
                let text = std::fs::read_to_string(path).ok()?;
                let token = text.trim();
                (!token.is_empty()).then(|| token.to_string())
            })
        };
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self {
            cache_dir,
            offline,
            token,
            endpoint,
            variant: WeightsVariant::Auto,
            progress: !env_true("HF_HUB_DISABLE_PROGRESS_BARS"),
        }
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A path from the environment, with a leading `~` expanded as Python's `expanduser` does.
fn env_path(name: &str) -> Option<PathBuf> {
    let value = env_nonempty(name)?;
    if value == "~" {
        return Some(home_dir());
    }
    match value.strip_prefix("~/") {
        Some(rest) => Some(home_dir().join(rest)),
        None => Some(PathBuf::from(value)),
    }
}

/// `huggingface_hub`'s truth test: 1, ON, YES, TRUE in any case.
fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
        .unwrap_or(false)
}

fn home_dir() -> PathBuf {
    dirs::home_dir().unwrap_or_else(|| PathBuf::from("."))
}

/// A repo id and revision, parsed from `owner/name` or `owner/name@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub repo_id: String,
    pub revision: String,
}

impl RepoSpec {
    /// Parses `owner/name[@revision]` with the rules of the Hub (`huggingface_hub`'s
    /// `validate_repo_id`): letters, digits, `-`, `_`, `.`; no `--` or `..`; each part starting and
    /// ending with a letter or digit; the name at most 96 characters. `None` when `spec` is not one.
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        let (owner, name) = id.split_once('/')?;
        let part_ok = |p: &str, max: usize| {
            !p.is_empty()
                && p.len() <= max
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && p.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.contains("--")
                && !p.contains("..")
        };
        let revision_ok = !revision.is_empty()
            && !revision.contains("..")
            && !revision.starts_with('/')
            && !revision.ends_with('/')
            && !revision.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\');
        if part_ok(owner, 96) && part_ok(name, 96) && !name.ends_with(".git") && revision_ok {
            Some(Self { repo_id: id.to_string(), revision: revision.to_string() })
        } else {
            None
        }
    }

    /// `owner/name`, with `@revision` unless the revision is `main`.
    pub fn display(&self) -> String {
        if self.revision == "main" {
            self.repo_id.clone()
        } else {
            format!("{}@{}", self.repo_id, self.revision)
        }
    }

    /// `models--owner--name`, the repo's folder in the cache.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo_id.replace('/', "--"))
    }
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// Resolves a model name to a checkpoint folder.
///
/// - An existing directory is returned as is (checked first: a folder named like a repo wins).
/// - `owner/name[@revision]` gives the snapshot folder `<cache>/models--owner--name/snapshots/<commit>`,
///   after downloading the files it lacks (none when `opts.offline`). Online, the commit is the one
///   the Hub names for the revision, and `refs/<revision>` is updated; offline, or when the Hub
///   cannot be reached and the cache already holds every file, it is read from `refs/<revision>`.
/// - Anything else is an [`Error::ModelSpec`].
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let repo = RepoSpec::parse(spec).ok_or_else(|| Error::ModelSpec { spec: spec.to_string() })?;
    let choose = Selection::Checkpoint;
    if opts.offline {
        resolve_cached(&repo, opts, &choose)
    } else {
        resolve_online(&repo, opts, &choose)
    }
}

/// Resolves `--lora`'s path: an existing file or folder as is, else a Hub repo
/// `owner/name[/subfolder][@revision]` (MCM's `yhzhai/mcm/modelscopet2v-webvid`): the LoRA files of
/// the subfolder (one level, or the repo's top level) are fetched as a model's are (none when
/// `opts.offline`) and the subfolder of the snapshot is returned. A LoRA file there is any
/// `.safetensors`, `adapter_config.json` or `.pt`.
pub fn resolve_lora(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let not_found = || Error::Lora {
        path: path.to_path_buf(),
        reason: "no such file or folder, nor a Hub repo `owner/name[/subfolder][@revision]`".into(),
    };
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() < 2 || parts.len() > 3 || parts[2..].iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err(not_found());
    }
    let repo_text = match revision {
        Some(rev) => format!("{}/{}@{rev}", parts[0], parts[1]),
        None => format!("{}/{}", parts[0], parts[1]),
    };
    let repo = RepoSpec::parse(&repo_text).ok_or_else(not_found)?;
    let subfolder = parts.get(2).map(|s| s.to_string()).unwrap_or_default();
    let choose = Selection::Lora { subfolder: subfolder.clone() };
    let snapshot =
        if opts.offline { resolve_cached(&repo, opts, &choose)? } else { resolve_online(&repo, opts, &choose)? };
    Ok(if subfolder.is_empty() { snapshot } else { snapshot.join(subfolder) })
}

/// Which files of a repo a resolution needs.
enum Selection {
    /// A text-to-video checkpoint ([`select_files`]).
    Checkpoint,
    /// The LoRA files directly in `subfolder` (`""`: the top level).
    Lora { subfolder: String },
}

impl Selection {
    fn files(&self, available: &[String], variant: WeightsVariant) -> std::result::Result<Vec<String>, String> {
        match self {
            Selection::Checkpoint => select_files(available, variant),
            Selection::Lora { subfolder } => {
                let files: Vec<String> = available
                    .iter()
                    .filter(|f| {
                        let name = if subfolder.is_empty() {
                            Some(f.as_str()).filter(|n| !n.contains('/'))
                        } else {
                            f.strip_prefix(subfolder.as_str())
                                .and_then(|r| r.strip_prefix('/'))
                                .filter(|n| !n.contains('/'))
                        };
                        name.is_some_and(|n| {
                            n.ends_with(".safetensors") || n == "adapter_config.json" || n.ends_with(".pt")
                        })
                    })
                    .cloned()
                    .collect();
                if files.is_empty() {
                    let at = if subfolder.is_empty() { String::new() } else { format!("{subfolder}/") };
                    Err(format!("{at}*.safetensors, {at}adapter_config.json or {at}*.pt (a LoRA)"))
                } else {
                    Ok(files)
                }
            }
        }
    }

    /// What the repo must hold, for the message when it lacks a file.
    fn expected(&self) -> &'static str {
        match self {
            Selection::Checkpoint => {
                "the repo has no such file: t2v needs a text-to-video checkpoint in the diffusers \
                 layout (model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/)"
            }
            Selection::Lora { .. } => {
                "the repo has no such file: a LoRA repo (or its subfolder) holds a .safetensors LoRA, a PEFT \
                 adapter (adapter_config.json + adapter_model.safetensors) or a .pt list"
            }
        }
    }
}

/// The files of a checkpoint to fetch, chosen among `available` (paths inside the repo, with `/`):
/// the required configs, the optional ones that are there, and for each weighted component the
/// weights files that [`select_weights`] picks for `variant`. A component without the variant gets
/// the files of [`WeightsVariant::Auto`], as diffusers' download does
/// (`variant_compatible_siblings`): the loader then says which variant is missing.
///
/// `Err` names the first required file that is not available.
pub fn select_files(available: &[String], variant: WeightsVariant) -> std::result::Result<Vec<String>, String> {
    let has = |f: &str| available.iter().any(|a| a == f);
    let mut files = Vec::new();
    for f in REQUIRED_FILES {
        if !has(f) {
            return Err((*f).to_string());
        }
        files.push((*f).to_string());
    }
    for f in OPTIONAL_FILES {
        if has(f) {
            files.push((*f).to_string());
        }
    }
    for component in WEIGHTED_COMPONENTS {
        let names: Vec<&str> = available
            .iter()
            .filter_map(|f| f.strip_prefix(component)?.strip_prefix('/'))
            .filter(|name| !name.contains('/'))
            .collect();
        let chosen = select_weights(names.iter().copied(), variant)
            .or_else(|| select_weights(names.iter().copied(), WeightsVariant::Auto));
        match chosen {
            Some((_, chosen)) => files.extend(chosen.iter().map(|name| format!("{component}/{name}"))),
            None => return Err(format!("{component}/*.safetensors or {component}/*.bin (the weights)")),
        }
    }
    Ok(files)
}

fn repo_dir(repo: &RepoSpec, opts: &HubOptions) -> PathBuf {
    opts.cache_dir.join(repo.folder_name())
}

fn ref_path(repo: &RepoSpec, opts: &HubOptions) -> PathBuf {
    repo_dir(repo, opts).join("refs").join(&repo.revision)
}

/// The commit the cache knows for the revision: the revision itself when it is a commit hash with
/// a snapshot, else the content of `refs/<revision>`.
fn cached_commit(repo: &RepoSpec, opts: &HubOptions) -> Option<String> {
    let snapshots = repo_dir(repo, opts).join("snapshots");
    if is_commit_hash(&repo.revision) && snapshots.join(&repo.revision).is_dir() {
        return Some(repo.revision.clone());
    }
    let commit = std::fs::read_to_string(ref_path(repo, opts)).ok()?;
    let commit = commit.trim();
    (!commit.is_empty() && snapshots.join(commit).is_dir()).then(|| commit.to_string())
}

/// The files present in a snapshot (symlinks to missing blobs do not count), at the top level and
/// one folder down, as repo paths.
fn snapshot_files(snapshot: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let Ok(top) = std::fs::read_dir(snapshot) else { return files };
    for entry in top.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        let path = entry.path();
        if path.is_file() {
            files.push(name);
        } else if path.is_dir() {
            let Ok(sub) = std::fs::read_dir(&path) else { continue };
            for e in sub.flatten() {
                if let Ok(n) = e.file_name().into_string() {
                    if e.path().is_file() {
                        files.push(format!("{name}/{n}"));
                    }
                }
            }
        }
    }
    files.sort();
    files
}

/// The snapshot folder from the cache alone, when it holds every file needed.
fn resolve_cached(repo: &RepoSpec, opts: &HubOptions, choose: &Selection) -> Result<PathBuf> {
    let offline = |file: String| Error::Offline { repo: repo.display(), file, cache: opts.cache_dir.clone() };
    let Some(commit) = cached_commit(repo, opts) else {
        // Nothing cached: name the first file the selection would want.
        return Err(offline(choose.files(&[], opts.variant).err().unwrap_or_else(|| "model_index.json".into())));
    };
    let snapshot = repo_dir(repo, opts).join("snapshots").join(&commit);
    choose.files(&snapshot_files(&snapshot), opts.variant).map_err(offline)?;
    Ok(snapshot)
}

fn resolve_online(repo: &RepoSpec, opts: &HubOptions, choose: &Selection) -> Result<PathBuf> {
    let cache = Cache::new(opts.cache_dir.clone());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(opts.endpoint.trim_end_matches('/').to_string())
        // `from_cache` reads `<cache>/../token`; the token is the one the options carry.
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(3)
        .build()
        .map_err(|e| download_error(repo, "the file list", &e, opts))?;
    let hf_repo = Repo::with_revision(repo.repo_id.clone(), RepoType::Model, repo.revision.clone());

    let info = match repo_info(&api.repo(hf_repo)) {
        Ok(info) => info,
        Err(InfoError::Api(err)) => {
            let err = download_error(repo, "the file list", &err, opts);
            if let Error::Download { reason, .. } = &err {
                if reason.starts_with(UNREACHABLE) {
                    // Like huggingface_hub: without a connection, use a complete cached snapshot.
                    if let Ok(snapshot) = resolve_cached(repo, opts, choose) {
                        if opts.progress {
                            eprintln!("warning: {reason}; using the cached snapshot {}", snapshot.display());
                        }
                        return Ok(snapshot);
                    }
                }
            }
            return Err(err);
        }
        Err(InfoError::Parse(reason)) => {
            return Err(Error::Download {
                repo: repo.display(),
                file: "the file list".to_string(),
                reason: format!("the Hub's answer is not understood ({reason}): run again"),
            })
        }
    };
    let commit = info.commit.clone();
    let available: Vec<String> = info.files.iter().map(|f| f.path.clone()).collect();
    let files = choose.files(&available, opts.variant).map_err(|file| Error::Download {
        repo: repo.display(),
        file,
        reason: choose.expected().to_string(),
    })?;

    let dir = repo_dir(repo, opts);
    let snapshot = dir.join("snapshots").join(&commit);
    if repo.revision != commit {
        // What huggingface_hub records: the branch or tag now points at this commit.
        let cache_repo = cache.repo(Repo::with_revision(repo.repo_id.clone(), RepoType::Model, repo.revision.clone()));
        cache_repo.create_ref(&commit).map_err(|e| Error::io(ref_path(repo, opts), e))?;
    }

    // Files whose blob is already in the cache (same contents under another commit, or fetched
    // by Python) only need their link, as huggingface_hub does.
    for file in &files {
        let link = snapshot.join(file);
        if link.is_file() {
            continue;
        }
        let Some(remote) = info.files.iter().find(|f| &f.path == file) else { continue };
        let Some(etag) = &remote.etag else { continue };
        let blob = dir.join("blobs").join(etag);
        // hf-hub resumes `<etag>.part` with `Range: bytes=<len>-`, which the Hub refuses (416)
        // when the part is already whole (a run stopped just before its rename): finish it here.
        let part = blob.with_extension("part");
        if let (false, Ok(meta), Some(size)) = (blob.is_file(), part.metadata(), remote.size) {
            if meta.len() == size {
                std::fs::rename(&part, &blob).map_err(|e| Error::io(&part, e))?;
            } else if meta.len() > size {
                std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
            }
        }
        if blob.is_file() {
            link_blob(&blob, &link).map_err(|e| Error::io(&link, e))?;
        }
    }

    let missing: Vec<&String> = files.iter().filter(|f| !snapshot.join(f).is_file()).collect();
    if !missing.is_empty() {
        if opts.progress {
            let bytes: u64 =
                missing.iter().filter_map(|m| info.files.iter().find(|f| &&f.path == m).and_then(|f| f.size)).sum();
            eprintln!(
                "downloading {} file(s), {:.2} GB, of {} (commit {}) into {}",
                missing.len(),
                bytes as f64 / 1e9,
                repo.display(),
                &commit[..commit.len().min(12)],
                opts.cache_dir.display()
            );
        }
        // Downloads name the commit, not the branch, so that every file comes from the same
        // commit even if the branch moves meanwhile. hf-hub then writes `refs/<commit>`, which
        // huggingface_hub never does: it is removed afterwards unless it was there before.
        let commit_ref = dir.join("refs").join(&commit);
        let commit_ref_existed = commit_ref.exists();
        let pinned = api.repo(Repo::with_revision(repo.repo_id.clone(), RepoType::Model, commit.clone()));
        let mut result = Ok(());
        for file in missing {
            let link = snapshot.join(file);
            // A link left behind by a deleted blob: hf-hub would fail to create it again.
            if link.symlink_metadata().is_ok() && !link.exists() {
                let _ = std::fs::remove_file(&link);
            }
            if let Err(e) = pinned.download(file) {
                result = Err(download_error(repo, file, &e, opts));
                break;
            }
            if !link.is_file() {
                result = Err(Error::Download {
                    repo: repo.display(),
                    file: file.clone(),
                    reason: format!("the download did not land at {}: run again", link.display()),
                });
                break;
            }
        }
        if !commit_ref_existed && repo.revision != commit {
            let _ = std::fs::remove_file(&commit_ref);
        }
        result?;
    }
    Ok(snapshot)
}

/// What the Hub says about a revision: its commit and files.
struct RepoFiles {
    commit: String,
    files: Vec<RemoteFile>,
}

struct RemoteFile {
    path: String,
    /// The blob name in the cache: the sha256 of an LFS file, the git blob id of another.
    etag: Option<String>,
    size: Option<u64>,
}

enum InfoError {
    Api(ApiError),
    Parse(String),
}

/// `GET /api/models/<id>/revision/<rev>?blobs=true`: hf-hub's `info()` request, asking also for
/// each file's blob id and size.
fn repo_info(api_repo: &hf_hub::api::sync::ApiRepo) -> std::result::Result<RepoFiles, InfoError> {
    let response = api_repo
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| InfoError::Api(ApiError::RequestError(Box::new(e))))?;
    let value: serde_json::Value = response.into_json().map_err(|e| InfoError::Parse(e.to_string()))?;
    let commit = value
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| InfoError::Parse("no commit `sha`".to_string()))?
        .to_string();
    let siblings = value
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or_else(|| InfoError::Parse("no `siblings`".to_string()))?;
    let files = siblings
        .iter()
        .filter_map(|s| {
            let path = s.get("rfilename")?.as_str()?.to_string();
            let lfs = s.get("lfs");
            let etag = lfs
                .and_then(|l| l.get("sha256"))
                .or_else(|| s.get("blobId"))
                .and_then(|e| e.as_str())
                // Used as a file name: only plain hex digests.
                .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_hexdigit()))
                .map(str::to_string);
            let size = lfs.and_then(|l| l.get("size")).or_else(|| s.get("size")).and_then(|v| v.as_u64());
            Some(RemoteFile { path, etag, size })
        })
        .collect();
    Ok(RepoFiles { commit, files })
}

/// Links `link` to `blob` with a relative symlink, as the hub clients do.
fn link_blob(blob: &Path, link: &Path) -> std::io::Result<()> {
    let parent = link.parent().expect("a snapshot file has a parent folder");
    std::fs::create_dir_all(parent)?;
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link)?;
    }
    // link = <repo>/snapshots/<commit>/<a>/<b>, blob = <repo>/blobs/<etag>: climb to <repo>.
    let repo_dir = blob.parent().and_then(Path::parent).expect("blobs/ is inside the repo folder");
    let depth = link.strip_prefix(repo_dir).map(|rel| rel.components().count() - 1).unwrap_or(0);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().expect("a blob has a name"));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, link)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, link).map(|_| ())
    }
}

/// How the reason of a download error starts when the Hub could not be reached at all.
const UNREACHABLE: &str = "cannot reach the Hub";

fn download_error(repo: &RepoSpec, file: &str, err: &ApiError, opts: &HubOptions) -> Error {
    Error::Download { repo: repo.display(), file: file.to_string(), reason: api_error_reason(repo, err, opts) }
}

fn api_error_reason(repo: &RepoSpec, err: &ApiError, opts: &HubOptions) -> String {
    match err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(code, response) => {
                let hf_code = response.header("x-error-code").unwrap_or("").to_string();
                let hf_message =
                    response.header("x-error-message").unwrap_or("").trim().trim_end_matches('.').to_string();
                let what =
                    if hf_message.is_empty() { format!("HTTP {code}") } else { format!("HTTP {code}, {hf_message}") };
                let hint = match (*code, hf_code.as_str()) {
                    (_, "GatedRepo") => format!(
                        "the repo is gated: accept its conditions at {}/{} while logged in, then \
                         set HF_TOKEN (or run `hf auth login`)",
                        opts.endpoint.trim_end_matches('/'),
                        repo.repo_id
                    ),
                    (_, "RevisionNotFound") => {
                        format!("the repo has no revision `{}`: check the part after @", repo.revision)
                    }
                    (_, "EntryNotFound") => "the file is not in the repo".to_string(),
                    (401 | 403, _) if opts.token.is_some() => {
                        "the token was refused, or it gives no access to this repo: check HF_TOKEN \
                         (or the token saved by `hf auth login`), and that no local folder of \
                         that name was meant"
                            .to_string()
                    }
                    (401 | 403 | 404, _) => "no such model repo on the Hub (and no local folder \
                         of that name), or it is private or gated: then set HF_TOKEN or run \
                         `hf auth login`"
                        .to_string(),
                    (429, _) => "the Hub is rate-limiting: wait a little and run again, or log in \
                                 (HF_TOKEN) for a higher limit"
                        .to_string(),
                    (500..=599, _) => "the Hub had a server error: run again later, or set \
                                       HF_HUB_OFFLINE=1 if the model is already in the cache"
                        .to_string(),
                    _ => "run again; if it persists, download the model with `hf download` and \
                          load it from its folder"
                        .to_string(),
                };
                format!("{what}: {hint}")
            }
            ureq::Error::Transport(t) => format!(
                "{UNREACHABLE} at {} ({t}): check the network connection or proxy (HTTPS_PROXY), or \
                 set HF_HUB_OFFLINE=1 to use only what is already in the cache",
                opts.endpoint
            ),
        },
        ApiError::TooManyRetries(inner) => {
            format!("gave up after retries: {}", api_error_reason(repo, inner, opts))
        }
        ApiError::IoError(e) => format!(
            "writing into the cache {} failed ({e}): check the free space and permissions, or point \
             HF_HUB_CACHE elsewhere",
            opts.cache_dir.display()
        ),
        ApiError::LockAcquisition(path) => format!(
            "{} is locked: another process is downloading the same file; wait for it to finish \
             (or delete the lock file if none is running)",
            path.display()
        ),
        ApiError::InvalidResume => "a partial download (blobs/*.part) in the cache is larger than \
                                    the file: delete it and run again"
            .to_string(),
        ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => format!(
            "the Hub's answer lacks a valid `{h}` header (a proxy may be rewriting it): run again, \
             or download with `hf download` and load it from its folder"
        ),
        other => format!("{other}: run again"),
    }
}
