//! Offline tests of model resolution through the Hugging Face cache.
//!
//! A cache is laid out in a temp dir exactly as the hub clients lay it out (blobs/, refs/main,
//! snapshots/<commit>/ with relative symlinks to the blobs), from the fixture model `tiny-t2v`.
//! Downloads are tested against a small HTTP server on 127.0.0.1 that answers like the Hub
//! (`/api/models/...` and `/.../resolve/...`), so nothing leaves the machine.
//!
//! One file: each file under tests/ is a binary of its own to link; every hub case shares the cache
//! builder.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::fixtures;
use common::http::{Request, Response, Server};
use t2v::checkpoint::hub::select_files;
use t2v::checkpoint::{resolve_model, HubOptions, RepoSpec, WeightsVariant, DEFAULT_MODEL};
use t2v::error::Error;
use tempfile::TempDir;

fn tiny() -> PathBuf {
    fixtures().join("tiny-t2v")
}

const COMMIT: &str = "8227dddca75a8561bb7c37e0d2e2fc3b1fc4fd6c";
const NEW_COMMIT: &str = "1111111111222222222233333333334444444444";
const REPO_FOLDER: &str = "models--damo-vilab--text-to-video-ms-1.7b";

/// Environment variables are process-wide and tests run on parallel threads: whatever sets or
/// removes one holds this lock. `resolve_model` itself reads none.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A cache laid out like the hub clients'.

fn hex_digest(bytes: &[u8], chars: usize) -> String {
    let mut out = String::new();
    let mut seed = 0u64;
    while out.len() < chars {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        bytes.hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
        seed += 1;
    }
    out.truncate(chars);
    out
}

/// Stand-in for a file's etag: a sha256-like name for weights (LFS), a git-sha1-like one otherwise.
fn etag_of(path: &str, bytes: &[u8]) -> String {
    if is_lfs(path) {
        hex_digest(bytes, 64)
    } else {
        hex_digest(bytes, 40)
    }
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || path.ends_with(".pth")
}

/// The fixture's files as (repo path, contents), without the reference outputs.
fn fixture_files() -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_str().unwrap().replace('\\', "/");
                // The reference's outputs lie beside the checkpoint; they are not part of it.
                if rel.starts_with("reference.") || ["v2v/", "long/", "lora/"].iter().any(|d| rel.starts_with(d)) {
                    continue;
                }
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&tiny(), &tiny(), &mut out);
    out.sort();
    assert!(out.iter().any(|(p, _)| p == "model_index.json"), "fixture {} is not a checkpoint", tiny().display());
    out
}

/// Writes `files` into `<cache>/<REPO_FOLDER>` as blobs + snapshot links, and `refs/<name>` for
/// each of `refs`, the way huggingface_hub does (relative symlinks, ref files without newline).
fn add_snapshot(cache: &Path, commit: &str, files: &[(String, Vec<u8>)], refs: &[&str]) -> PathBuf {
    let repo = cache.join(REPO_FOLDER);
    let snapshot = repo.join("snapshots").join(commit);
    for (rel, bytes) in files {
        let etag = etag_of(rel, bytes);
        let blob = repo.join("blobs").join(&etag);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, bytes).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = rel.split('/').count() + 1; // up from <rel>'s folder to the repo folder
        let target = format!("{}blobs/{etag}", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link).unwrap();
    }
    for name in refs {
        let path = repo.join("refs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
    snapshot
}

fn cached_repo() -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new().unwrap();
    let cache = dir.path().join("hub");
    let snapshot = add_snapshot(&cache, COMMIT, &fixture_files(), &["main"]);
    (dir, cache, snapshot)
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions { offline: true, progress: false, ..HubOptions::new(cache) }
}

/// What the loader opens: model_index.json and each component's files.
fn assert_checkpoint(folder: &Path) {
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let got = std::fs::read(folder.join(f)).unwrap_or_else(|e| panic!("{f} in {}: {e}", folder.display()));
        let want = std::fs::read(tiny().join(f)).unwrap();
        assert!(got == want, "{f} differs from the fixture");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["unet"][1], "UNet3DConditionModel");
}

/// Snapshot entries are relative symlinks into blobs/, as the hub clients make them.
fn assert_links_into_blobs(snapshot: &Path) {
    for f in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"] {
        let link = snapshot.join(f);
        let meta = link.symlink_metadata().unwrap();
        assert!(meta.file_type().is_symlink(), "{f} is not a symlink");
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.is_relative(), "{f} -> {} is not relative", target.display());
        let resolved = std::fs::canonicalize(&link).unwrap();
        let blobs = std::fs::canonicalize(snapshot.parent().unwrap().parent().unwrap().join("blobs")).unwrap();
        assert_eq!(resolved.parent().unwrap(), blobs, "{f} does not point into blobs/");
    }
}

// ---------------------------------------------------------------------------------------------
// Offline resolution.

#[test]
fn repo_id_resolves_to_the_cached_snapshot() {
    let (_dir, cache, snapshot) = cached_repo();
    let got = resolve_model(DEFAULT_MODEL, &offline(&cache)).unwrap();
    assert_eq!(got, cache.join(REPO_FOLDER).join("snapshots").join(COMMIT));
    assert_eq!(got, snapshot);
    assert_checkpoint(&got);
    assert_links_into_blobs(&got);
}

#[test]
fn revisions_main_commit_and_tags() {
    let (_dir, cache, snapshot) = cached_repo();
    let opts = offline(&cache);
    assert_eq!(resolve_model(&format!("{DEFAULT_MODEL}@main"), &opts).unwrap(), snapshot);
    // A commit hash names its snapshot directly (huggingface_hub writes no ref for it).
    assert_eq!(resolve_model(&format!("{DEFAULT_MODEL}@{COMMIT}"), &opts).unwrap(), snapshot);
    // A branch or tag the cache has no ref for.
    let err = resolve_model(&format!("{DEFAULT_MODEL}@v1.0"), &opts).unwrap_err();
    match &err {
        Error::Offline { repo, file, .. } => {
            assert_eq!(repo, "damo-vilab/text-to-video-ms-1.7b@v1.0");
            assert_eq!(file, "model_index.json");
        }
        other => panic!("unexpected error {other:?}"),
    }
    // Refs with a slash live in subfolders (refs/refs/pr/1), as huggingface_hub stores them.
    add_snapshot(&cache, COMMIT, &[], &["v1.0", "refs/pr/1"]);
    assert_eq!(resolve_model(&format!("{DEFAULT_MODEL}@v1.0"), &opts).unwrap(), snapshot);
    assert_eq!(resolve_model(&format!("{DEFAULT_MODEL}@refs/pr/1"), &opts).unwrap(), snapshot);
}

#[test]
fn a_file_missing_offline_is_a_clear_error() {
    let (_dir, cache, snapshot) = cached_repo();
    let opts = offline(&cache);

    std::fs::remove_file(snapshot.join("vae/config.json")).unwrap();
    let err = resolve_model(DEFAULT_MODEL, &opts).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::Offline { repo, file, cache: c } => {
            assert_eq!(repo, DEFAULT_MODEL);
            assert_eq!(file, "vae/config.json");
            assert_eq!(c, &cache);
        }
        other => panic!("unexpected error {other:?}"),
    }
    for needle in ["vae/config.json", DEFAULT_MODEL, "HF_HUB_OFFLINE", "network", cache.to_str().unwrap()] {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
    println!("{msg}");

    // A link whose blob was deleted does not count as present.
    let (_dir2, cache2, snapshot2) = cached_repo();
    let blob = std::fs::canonicalize(snapshot2.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(blob).unwrap();
    match resolve_model(DEFAULT_MODEL, &offline(&cache2)).unwrap_err() {
        Error::Offline { file, .. } => assert!(file.starts_with("unet/*.safetensors"), "{file}"),
        other => panic!("unexpected error {other:?}"),
    }

    // A repo that was never downloaded.
    let empty = TempDir::new().unwrap();
    let err = resolve_model("cerspense/zeroscope_v2_576w", &offline(empty.path())).unwrap_err();
    assert!(matches!(&err, Error::Offline { repo, .. } if repo == "cerspense/zeroscope_v2_576w"), "{err:?}");
}

#[test]
fn a_local_folder_is_returned_as_is() {
    let folder = tiny();
    let empty = TempDir::new().unwrap();
    let got = resolve_model(folder.to_str().unwrap(), &offline(empty.path())).unwrap();
    assert_eq!(got, folder);
    // Even online: a folder never reaches the network.
    let opts = HubOptions { endpoint: "http://127.0.0.1:1".into(), progress: false, ..HubOptions::new(empty.path()) };
    assert_eq!(resolve_model(folder.to_str().unwrap(), &opts).unwrap(), folder);
    // A folder whose path has the shape of a repo id wins over the repo.
    let shaped = empty.path().join("owner").join("name");
    std::fs::create_dir_all(&shaped).unwrap();
    assert_eq!(resolve_model(shaped.to_str().unwrap(), &opts).unwrap(), shaped);
}

#[test]
fn neither_a_folder_nor_a_repo_id_is_a_clear_error() {
    let empty = TempDir::new().unwrap();
    let opts = offline(empty.path());
    for spec in [
        "./no/such/folder",
        "/no/such/folder",
        "justaname",
        "a/b/c",
        "owner/na me",
        "owner--x/y",
        "o/n@",
        "",
        "-owner/name",
    ] {
        match resolve_model(spec, &opts) {
            Err(err @ Error::ModelSpec { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains(&format!("`{spec}`")) && msg.contains("repo id"), "{msg}");
            }
            other => panic!("{spec:?}: unexpected {other:?}"),
        }
    }
    println!("{}", resolve_model("./no/such/folder", &opts).unwrap_err());
}

#[test]
fn repo_spec_parsing() {
    let p = |s: &str| RepoSpec::parse(s).map(|r| (r.repo_id, r.revision));
    assert_eq!(p(DEFAULT_MODEL), Some((DEFAULT_MODEL.into(), "main".into())));
    assert_eq!(p("cerspense/zeroscope_v2_576w@abc"), Some(("cerspense/zeroscope_v2_576w".into(), "abc".into())));
    assert_eq!(p("a/b@refs/pr/3"), Some(("a/b".into(), "refs/pr/3".into())));
    for bad in ["a", "a/b/c", "a/", "/b", "a/b@", "a/b@..", "a..b/c", "a/b.git", "a /b", "a/b@x y"] {
        assert_eq!(p(bad), None, "{bad}");
    }
    assert_eq!(RepoSpec::parse(DEFAULT_MODEL).unwrap().folder_name(), REPO_FOLDER);
}

#[test]
fn file_selection() {
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let configs = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "vae/config.json",
    ];
    // What damo-vilab/text-to-video-ms-1.7b holds: both formats, both variants, and the original
    // ModelScope checkpoints at the top.
    let mut damo = list(&configs);
    damo.extend(list(&[
        "README.md",
        "configuration.json",
        "open_clip_pytorch_model.bin",
        "text2video_pytorch_model.pth",
        "VQGAN_autoencoder.pth",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/pytorch_model.fp16.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.bin",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.bin",
    ]));
    let full = select_files(&damo, WeightsVariant::Auto).unwrap();
    let weights: Vec<&String> = full.iter().filter(|f| !f.ends_with(".json") && !f.ends_with(".txt")).collect();
    assert_eq!(
        weights,
        [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors"
        ]
    );
    assert_eq!(full.len(), configs.len() + 3);
    let half = select_files(&damo, WeightsVariant::Fp16).unwrap();
    assert!(half.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    assert!(half.contains(&"text_encoder/model.fp16.safetensors".to_string()));
    assert!(!half.iter().any(|f| f.ends_with(".bin") || f == "unet/diffusion_pytorch_model.safetensors"));

    // zeroscope: .bin only; fp16 asked for but absent falls back to the plain files.
    let mut zeroscope = list(&configs);
    zeroscope.extend(list(&[
        "text_encoder/pytorch_model.bin",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "zs2_576w/text2video_pytorch_model.pth",
    ]));
    for variant in [WeightsVariant::Auto, WeightsVariant::Fp16, WeightsVariant::Full] {
        let files = select_files(&zeroscope, variant).unwrap();
        assert!(files.contains(&"unet/diffusion_pytorch_model.bin".to_string()));
        assert_eq!(files.len(), configs.len() + 3);
    }

    // Sharded safetensors: every shard of the chosen variant.
    let mut sharded = list(&configs);
    sharded.extend(list(&[
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
    ]));
    let files = select_files(&sharded, WeightsVariant::Auto).unwrap();
    let unet: Vec<&String> = files.iter().filter(|f| f.starts_with("unet/diffusion")).collect();
    assert_eq!(
        unet,
        [
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors"
        ]
    );
    let files = select_files(&sharded, WeightsVariant::Fp16).unwrap();
    assert!(files.contains(&"unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors".to_string()));

    // Optional tokenizer file; required ones; weights.
    let mut minimal = list(&configs);
    minimal.retain(|f| f != "tokenizer/special_tokens_map.json");
    minimal.extend(list(&["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]));
    assert_eq!(
        select_files(&minimal, WeightsVariant::Auto).unwrap_err(),
        "vae/*.safetensors or vae/*.bin (the weights)"
    );
    minimal.push("vae/diffusion_pytorch_model.safetensors".into());
    assert!(select_files(&minimal, WeightsVariant::Auto).is_ok());
    minimal.retain(|f| f != "tokenizer/merges.txt");
    assert_eq!(select_files(&minimal, WeightsVariant::Auto).unwrap_err(), "tokenizer/merges.txt");
}

#[test]
fn the_fp16_variant_offline() {
    let (_dir, cache, snapshot) = cached_repo();
    // Without fp16 files in the cache, asking for them falls back to the plain ones.
    let opts = HubOptions { variant: WeightsVariant::Fp16, ..offline(&cache) };
    assert_eq!(resolve_model(DEFAULT_MODEL, &opts).unwrap(), snapshot);
    // With only the fp16 unet in a snapshot, both settings resolve.
    let mut files = fixture_files();
    for (path, _) in files.iter_mut() {
        if path == "unet/diffusion_pytorch_model.safetensors" {
            *path = "unet/diffusion_pytorch_model.fp16.safetensors".into();
        }
    }
    let dir = TempDir::new().unwrap();
    let snap = add_snapshot(dir.path(), COMMIT, &files, &["main"]);
    for variant in [WeightsVariant::Auto, WeightsVariant::Fp16] {
        let opts = HubOptions { variant, ..offline(dir.path()) };
        assert_eq!(resolve_model(DEFAULT_MODEL, &opts).unwrap(), snap);
    }
}

/// The one test that sets environment variables: `HubOptions::from_env`.
#[test]
fn options_from_the_environment() {
    let _guard = env_lock();
    const VARS: &[&str] = &[
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HF_ENDPOINT",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ];
    let saved: Vec<(&str, Option<String>)> = VARS.iter().map(|v| (*v, std::env::var(v).ok())).collect();
    for v in VARS {
        std::env::remove_var(v);
    }
    let result = std::panic::catch_unwind(|| {
        let (dir, cache, snapshot) = cached_repo();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();

        std::env::set_var("XDG_CACHE_HOME", dir.path().join("xdg"));
        assert_eq!(HubOptions::from_env().cache_dir, dir.path().join("xdg/huggingface/hub"));
        std::env::set_var("HF_HOME", &home);
        let o = HubOptions::from_env();
        assert_eq!(o.cache_dir, home.join("hub"));
        assert!(!o.offline && o.token.is_none() && o.progress);
        assert_eq!(o.endpoint, "https://huggingface.co");
        std::fs::write(home.join("token"), "hf_from_file\n").unwrap();
        assert_eq!(HubOptions::from_env().token.as_deref(), Some("hf_from_file"));
        std::env::set_var("HF_TOKEN", "hf_from_env");
        assert_eq!(HubOptions::from_env().token.as_deref(), Some("hf_from_env"));
        std::env::set_var("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1");
        assert_eq!(HubOptions::from_env().token, None);
        std::env::set_var("HUGGINGFACE_HUB_CACHE", dir.path().join("older"));
        assert_eq!(HubOptions::from_env().cache_dir, dir.path().join("older"));
        std::env::set_var("HF_HUB_CACHE", &cache);
        assert_eq!(HubOptions::from_env().cache_dir, cache);
        for (value, expected) in [("1", true), ("true", true), ("YES", true), ("0", false), ("", false)] {
            std::env::set_var("HF_HUB_OFFLINE", value);
            assert_eq!(HubOptions::from_env().offline, expected, "HF_HUB_OFFLINE={value}");
        }
        std::env::set_var("HF_ENDPOINT", "https://hf-mirror.example");
        std::env::set_var("HF_HUB_DISABLE_PROGRESS_BARS", "1");
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let o = HubOptions::from_env();
        assert!(o.offline && !o.progress);
        assert_eq!(o.endpoint, "https://hf-mirror.example");
        // HF_HUB_OFFLINE=1: resolved from the cache, the (unreachable) endpoint never asked.
        assert_eq!(resolve_model(DEFAULT_MODEL, &o).unwrap(), snapshot);
        std::fs::remove_file(snapshot.join("text_encoder/config.json")).unwrap();
        let msg = resolve_model(DEFAULT_MODEL, &o).unwrap_err().to_string();
        assert!(msg.contains("text_encoder/config.json") && msg.contains("HF_HUB_OFFLINE"), "{msg}");
    });
    for (v, value) in saved {
        match value {
            Some(value) => std::env::set_var(v, value),
            None => std::env::remove_var(v),
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------
// Downloads, against a local server that answers like the Hub.

#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

struct MockRepo {
    id: String,
    commit: String,
    files: Vec<(String, Vec<u8>)>,
    gated: bool,
}

struct MockHub {
    server: Server,
    log: Arc<Mutex<Vec<Logged>>>,
}

impl MockHub {
    fn start(repos: Vec<MockRepo>) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let served = log.clone();
        let server = Server::start(move |request| serve(request, &repos, &served));
        Self { server, log }
    }

    fn endpoint(&self) -> String {
        self.server.url()
    }

    fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    /// The files requested through `/resolve/`.
    fn resolved(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter_map(|l| l.path.split_once("/resolve/").map(|(_, rest)| rest.split_once('/').unwrap().1.to_string()))
            .collect()
    }
}

fn serve(request: &Request, repos: &[MockRepo], log: &Mutex<Vec<Logged>>) -> Response {
    let path = request.path().to_string();
    let range = request.header("range").map(str::to_string);
    let auth = request.header("authorization").map(str::to_string);
    log.lock().unwrap().push(Logged { path: path.clone(), range: range.clone(), auth });
    let not_found = |code: &str| Response::new("404 Not Found", "not found").header("X-Error-Code", code);

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some(repo) = repos.iter().find(|r| rest.starts_with(&format!("{}/revision/", r.id))) else {
            return Response::new("401 Unauthorized", "{}").header("X-Error-Code", "RepoNotFound");
        };
        if repo.gated {
            return Response::new("401 Unauthorized", "{}")
                .header("X-Error-Code", "GatedRepo")
                .header("X-Error-Message", format!("Access to model {} is restricted.", repo.id));
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(p, bytes)| {
                let etag = etag_of(p, bytes);
                if is_lfs(p) {
                    serde_json::json!({"rfilename": p, "blobId": hex_digest(p.as_bytes(), 40), "size": bytes.len(),
                                       "lfs": {"sha256": etag, "size": bytes.len(), "pointerSize": 134}})
                } else {
                    serde_json::json!({"rfilename": p, "blobId": etag, "size": bytes.len()})
                }
            })
            .collect();
        let body = serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings}).to_string();
        return Response::new("200 OK", body).header("Content-Type", "application/json");
    }
    let Some((repo, rest)) =
        repos.iter().find_map(|r| path.strip_prefix(&format!("/{}/resolve/", r.id)).map(|rest| (r, rest)))
    else {
        return not_found("RepoNotFound");
    };
    let (revision, file) = rest.split_once('/').unwrap();
    if revision != repo.commit && revision != "main" {
        return not_found("RevisionNotFound");
    }
    let Some((_, bytes)) = repo.files.iter().find(|(p, _)| p == file) else {
        return not_found("EntryNotFound");
    };
    let etag = etag_of(file, bytes);
    let with_etags = |response: Response| {
        let response = response.header("X-Repo-Commit", repo.commit.clone());
        if is_lfs(file) {
            response.header("X-Linked-Etag", format!("\"{etag}\"")).header("ETag", "\"cdn-etag\"")
        } else {
            response.header("ETag", format!("\"{etag}\""))
        }
    };
    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end: usize =
                if b.is_empty() { bytes.len() - 1 } else { b.parse::<usize>().unwrap().min(bytes.len() - 1) };
            with_etags(Response::new("206 Partial Content", &bytes[start..=end]))
                .header("Content-Range", format!("bytes {start}-{end}/{}", bytes.len()))
        }
        None => with_etags(Response::new("200 OK", bytes.as_slice())),
    }
}

/// The fixture as the Hub would list it, plus files the pipeline must not fetch.
fn served_files() -> Vec<(String, Vec<u8>)> {
    let mut files = fixture_files();
    for (p, b) in [
        ("README.md", b"# tiny".to_vec()),
        ("text2video_pytorch_model.pth", vec![1u8; 1000]),
        ("unet/diffusion_pytorch_model.bin", vec![2u8; 1000]),
        ("unet/diffusion_pytorch_model.fp16.safetensors", vec![3u8; 1000]),
        ("text_encoder/pytorch_model.bin", vec![4u8; 1000]),
    ] {
        files.push((p.to_string(), b));
    }
    files
}

fn mock_damo(files: Vec<(String, Vec<u8>)>, commit: &str) -> MockHub {
    MockHub::start(vec![
        MockRepo { id: DEFAULT_MODEL.into(), commit: commit.into(), files, gated: false },
        MockRepo { id: "gated/model".into(), commit: COMMIT.into(), files: vec![], gated: true },
    ])
}

/// ureq (through hf-hub) sends every request through ALL_PROXY/HTTPS_PROXY/HTTP_PROXY and knows no
/// NO_PROXY: clear them so that 127.0.0.1 is reached directly.
fn clear_proxies() {
    let _guard = env_lock();
    for v in ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        std::env::remove_var(v);
    }
}

fn online(cache: &Path, hub: &MockHub) -> HubOptions {
    HubOptions { endpoint: hub.endpoint(), progress: false, ..HubOptions::new(cache) }
}

#[test]
fn downloads_only_the_needed_files_into_the_hub_layout() {
    clear_proxies();
    let hub = mock_damo(served_files(), COMMIT);
    let dir = TempDir::new().unwrap();
    let cache = dir.path().join("hub");
    let opts = HubOptions { token: Some("hf_secret".into()), ..online(&cache, &hub) };

    let got = resolve_model(DEFAULT_MODEL, &opts).unwrap();
    let repo_dir = cache.join(REPO_FOLDER);
    assert_eq!(got, repo_dir.join("snapshots").join(COMMIT));
    assert_checkpoint(&got);
    assert_links_into_blobs(&got);
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert!(!repo_dir.join("refs").join(COMMIT).exists(), "hf-hub's refs/<commit> was left behind");
    // Blobs are named by etag: sha256 for LFS files, git sha1 for the others.
    for (p, bytes) in fixture_files() {
        assert!(repo_dir.join("blobs").join(etag_of(&p, &bytes)).is_file(), "no blob for {p}");
    }

    let mut resolved = hub.resolved();
    resolved.sort();
    resolved.dedup();
    let mut wanted: Vec<String> = fixture_files().into_iter().map(|(p, _)| p).collect();
    wanted.sort();
    assert_eq!(resolved, wanted, "fetched files other than the pipeline's");
    assert!(hub.log().iter().all(|l| l.auth.as_deref() == Some("Bearer hf_secret")), "token not sent");
    // Downloads name the commit, so that every file comes from the same one.
    assert!(hub.log().iter().filter(|l| l.path.contains("/resolve/")).all(|l| l.path.contains(COMMIT)));

    // Second run: only the file list is asked for.
    let before = hub.log().len();
    assert_eq!(resolve_model(DEFAULT_MODEL, &opts).unwrap(), got);
    let after = hub.log();
    assert_eq!(after.len(), before + 1);
    assert!(after.last().unwrap().path.starts_with("/api/models/"));
    // And offline it resolves from what was downloaded.
    assert_eq!(resolve_model(DEFAULT_MODEL, &offline(&cache)).unwrap(), got);
    // The fp16 variant, asked for later: only the unet has one.
    let fp16 = HubOptions { variant: WeightsVariant::Fp16, ..opts.clone() };
    let seen = hub.resolved().len();
    assert_eq!(resolve_model(DEFAULT_MODEL, &fp16).unwrap(), got);
    let new: Vec<String> = hub.resolved().into_iter().skip(seen).collect();
    assert!(!new.is_empty() && new.iter().all(|f| f == "unet/diffusion_pytorch_model.fp16.safetensors"), "{new:?}");
    assert!(got.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
}

#[test]
fn a_partial_download_is_resumed() {
    clear_proxies();
    let files = fixture_files();
    let hub = mock_damo(files.clone(), COMMIT);
    let dir = TempDir::new().unwrap();
    let cache = dir.path().join("hub");
    let (path, bytes) = files.iter().find(|(p, _)| p == "unet/diffusion_pytorch_model.safetensors").unwrap();
    let blob = cache.join(REPO_FOLDER).join("blobs").join(etag_of(path, bytes));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(blob.with_extension("part"), &bytes[..half]).unwrap();

    // A part that is already whole (stopped before its rename) is only renamed; one longer than
    // the file is dropped and fetched again.
    let (vae, vae_bytes) = files.iter().find(|(p, _)| p == "vae/diffusion_pytorch_model.safetensors").unwrap();
    let vae_blob = cache.join(REPO_FOLDER).join("blobs").join(etag_of(vae, vae_bytes));
    std::fs::write(vae_blob.with_extension("part"), vae_bytes).unwrap();
    let (te, te_bytes) = files.iter().find(|(p, _)| p == "text_encoder/model.safetensors").unwrap();
    let te_blob = cache.join(REPO_FOLDER).join("blobs").join(etag_of(te, te_bytes));
    std::fs::write(te_blob.with_extension("part"), [te_bytes.as_slice(), b"junk"].concat()).unwrap();

    let got = resolve_model(DEFAULT_MODEL, &online(&cache, &hub)).unwrap();
    assert_checkpoint(&got);
    assert!(!hub.resolved().contains(vae), "a whole part file was downloaded again");
    assert!(hub.resolved().contains(te));
    for b in [&vae_blob, &te_blob] {
        assert!(!b.with_extension("part").exists());
    }
    assert_eq!(std::fs::read(got.join(path)).unwrap(), *bytes);
    assert!(!blob.with_extension("part").exists());
    let ranges: Vec<Option<String>> =
        hub.log().into_iter().filter(|l| l.path.ends_with(path.as_str())).map(|l| l.range).collect();
    assert_eq!(ranges, [Some("bytes=0-0".to_string()), Some(format!("bytes={half}-"))], "not resumed");
}

#[test]
fn a_cached_blob_is_linked_not_downloaded_again() {
    clear_proxies();
    // The cache has commit COMMIT; the branch has moved to NEW_COMMIT, whose unet config changed.
    let (_dir, cache, _old) = cached_repo();
    let mut files = fixture_files();
    for (p, b) in files.iter_mut() {
        if p == "unet/config.json" {
            b.extend_from_slice(b"\n");
        }
    }
    let hub = mock_damo(files, NEW_COMMIT);
    let got = resolve_model(DEFAULT_MODEL, &online(&cache, &hub)).unwrap();
    assert_eq!(got, cache.join(REPO_FOLDER).join("snapshots").join(NEW_COMMIT));
    assert_eq!(std::fs::read_to_string(cache.join(REPO_FOLDER).join("refs/main")).unwrap(), NEW_COMMIT);
    // Each download is two requests (hf-hub's metadata probe, then the body).
    assert_eq!(hub.resolved(), ["unet/config.json", "unet/config.json"]);
    assert_links_into_blobs(&got);
    assert!(std::fs::read(got.join("unet/config.json")).unwrap().ends_with(b"\n"));
}

#[test]
fn hub_errors_say_what_to_do() {
    clear_proxies();
    let hub = mock_damo(served_files(), COMMIT);
    let dir = TempDir::new().unwrap();
    let opts = online(dir.path(), &hub);

    let msg = resolve_model("gated/model", &opts).unwrap_err().to_string();
    assert!(msg.contains("gated") && msg.contains("HF_TOKEN") && msg.contains("gated/model"), "{msg}");
    println!("{msg}");
    let msg = resolve_model("nobody/nothing", &opts).unwrap_err().to_string();
    assert!(msg.contains("nobody/nothing") && msg.contains("no local folder"), "{msg}");
    println!("{msg}");

    // A repo that is not a diffusers text-to-video checkpoint.
    let mut files = fixture_files();
    files.retain(|(p, _)| p != "unet/config.json");
    let hub2 = mock_damo(files, COMMIT);
    match resolve_model(DEFAULT_MODEL, &online(dir.path(), &hub2)).unwrap_err() {
        Error::Download { file, reason, .. } => {
            assert_eq!(file, "unet/config.json");
            assert!(reason.contains("diffusers"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(hub2.resolved().is_empty());
}

#[test]
fn an_unreachable_hub_falls_back_to_a_complete_cache() {
    clear_proxies();
    // Nothing listens on port 1: the connection is refused at once.
    let (_dir, cache, snapshot) = cached_repo();
    let opts = HubOptions { endpoint: "http://127.0.0.1:1".into(), progress: false, ..HubOptions::new(&cache) };
    assert_eq!(resolve_model(DEFAULT_MODEL, &opts).unwrap(), snapshot);

    let empty = TempDir::new().unwrap();
    let opts = HubOptions { cache_dir: empty.path().to_path_buf(), ..opts };
    let err = resolve_model(DEFAULT_MODEL, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Download { .. }), "{err:?}");
    assert!(msg.contains("cannot reach the Hub") && msg.contains("HF_HUB_OFFLINE"), "{msg}");
    println!("{msg}");
}
