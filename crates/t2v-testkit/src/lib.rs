//! What t2v's test suites share (a dev-dependency only; nothing here ships).
//!
//! The rule for a test whose tool is missing (ffmpeg, Chromium, PostgreSQL, a Python package):
//! on a developer's machine it prints `SKIPPED` and why, and passes; where CI runs (`CI=true`),
//! whose script installs every tool, it fails, so a missing tool can never pass as a skipped test.

use std::path::PathBuf;
use std::process::Command;

/// Whether the tests run in CI (`CI=true`, as CI services and `.ci/run` set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A test (or a part of one) cannot run here because `reason`: prints `SKIPPED: reason` for the
/// caller to return; in CI, panics instead.
#[track_caller]
pub fn skip(reason: impl std::fmt::Display) {
    if in_ci() {
        panic!("{reason}: CI=true, where every tool must be installed (.ci/run installs them), so this test fails rather than skips");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Whether `tool` runs (`tool ARG` starts; ffmpeg's tools take `-version`).
pub fn runs(tool: &str, arg: &str) -> bool {
    Command::new(tool).arg(arg).output().is_ok()
}

/// `tool` when it runs; else [`skip`]s (so `None` means: return from the test).
#[track_caller]
pub fn require(tool: &str, arg: &str, install: &str) -> Option<String> {
    if runs(tool, arg) {
        Some(tool.to_string())
    } else {
        skip(format!("{tool} is not installed ({install})"));
        None
    }
}

/// ffmpeg's `ffmpeg` or `ffprobe`, or [`skip`]s.
#[track_caller]
pub fn ffmpeg_tool(tool: &str) -> Option<String> {
    require(tool, "-version", "apt-get install -y ffmpeg")
}

/// Chromium's binary, or [`skip`]s. `T2V_TEST_CHROMIUM` names another one.
#[track_caller]
pub fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("T2V_TEST_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().map(|o| o.status.success()).unwrap_or(false));
    match found {
        Some(b) => Some(PathBuf::from(b)),
        None => {
            skip("Chromium is not installed (apt-get install -y chromium, or set T2V_TEST_CHROMIUM)");
            None
        }
    }
}

/// The flags every headless Chromium of the tests runs with: no sandbox (root in CI), no GPU,
/// nothing fetched from the network, and a fresh profile in `user_data_dir`.
pub fn chromium_flags(user_data_dir: &std::path::Path) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    flags.push(format!("--user-data-dir={}", user_data_dir.display()));
    flags
}

/// A Python that can `import module` (`T2V_TEST_PYTHON`, else `python3`), or [`skip`]s.
#[track_caller]
pub fn python_with(module: &str, install: &str) -> Option<String> {
    let python = std::env::var("T2V_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some(python)
    } else {
        skip(format!("{python} cannot import {module} ({install}, or set T2V_TEST_PYTHON to a Python that can)"));
        None
    }
}
