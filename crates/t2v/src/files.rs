//! Every file t2v reads by path is opened here: only regular files (a FIFO would block the open or
//! the read for ever, a device such as /dev/zero never ends, a folder is not data), each kind with
//! a size bound fitting what it is, so a wrong path fails at once with a message that names it.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// What a file is, which decides how large it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A component's `config.json`, `model_index.json`, `scheduler_config.json`: kilobytes.
    Config,
    /// A run's settings record (JSON beside a video): kilobytes, a long prompt at most.
    Settings,
    /// A list of prompts, one a line.
    Prompts,
    /// `vocab.json`, `merges.txt`, `tokenizer_config.json`, `tokenizer.json`: a few MB.
    Tokenizer,
    /// Weights: any size (safetensors are memory-mapped, pickles are checked before reading).
    Weights,
    /// An input video or image, or an MP4 read for its metadata: any size, read in pieces.
    Video,
}

impl FileKind {
    /// The largest size accepted, in bytes.
    pub fn limit(self) -> Option<u64> {
        match self {
            FileKind::Config => Some(4 << 20),
            FileKind::Settings => Some(4 << 20),
            FileKind::Prompts => Some(16 << 20),
            FileKind::Tokenizer => Some(64 << 20),
            FileKind::Weights | FileKind::Video => None,
        }
    }

    /// How messages name it: "a config" must be a file.
    pub fn what(self) -> &'static str {
        match self {
            FileKind::Config => "a config",
            FileKind::Settings => "a settings file",
            FileKind::Prompts => "a prompts file",
            FileKind::Tokenizer => "a tokenizer file",
            FileKind::Weights => "a weights file",
            FileKind::Video => "a video file",
        }
    }
}

/// Opens `path` for reading if it is a regular file (after following links) no larger than
/// `kind` allows. The open itself cannot block: it does not wait for a FIFO's writer.
pub fn open_regular(path: &Path, kind: FileKind) -> Result<File> {
    let file = open_nonblocking(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotAFile { path: path.to_path_buf(), found: file_type_name(&meta), what: kind.what() });
    }
    if let Some(limit) = kind.limit() {
        if meta.len() > limit {
            return Err(Error::FileTooLarge { path: path.to_path_buf(), size: meta.len(), limit, what: kind.what() });
        }
    }
    Ok(file)
}

/// The whole of `path` (see [`open_regular`]); a file that grows past the bound while it is read
/// is refused as well.
pub fn read_bounded(path: &Path, kind: FileKind) -> Result<Vec<u8>> {
    let file = open_regular(path, kind)?;
    let limit = kind.limit().unwrap_or(u64::MAX);
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
            what: kind.what(),
        });
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text(path: &Path, kind: FileKind) -> Result<String> {
    String::from_utf8(read_bounded(path, kind)?).map_err(|e| {
        Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text ({e})")))
    })
}

/// Whether `path` is missing (as opposed to there but unreadable, or not a file).
pub fn is_missing(err: &Error) -> bool {
    matches!(err, Error::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK only matters for FIFOs and devices, which are refused right after; reads of
    // a regular file ignore it.
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

fn file_type_name(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}
