//! The `zip` crate reads the archive; what torch.save's layout promises on top of it (one
//! `data.pkl`, little-endian storages, each stored uncompressed with the size its pickle declares)
//! no crate checks, so it is checked here.
//!
//! The layout: `<prefix>data.pkl` (the pickle), `<prefix>byteorder`, and one raw storage per
//! `<prefix>data/<key>` entry, `<prefix>` being the archive's folder (`archive/` by default).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::DType;

use super::corrupt;
use crate::error::{Error, Result};

/// An opened `torch.save` zip archive.
pub(super) struct Archive {
    path: PathBuf,
    zip: zip::ZipArchive<BufReader<File>>,
    /// The folder of `data.pkl` inside the archive, with its trailing slash (or empty).
    prefix: String,
    /// The entry holding the state dict's pickle.
    data_pkl: String,
    /// Every pickle in the archive, `data.pkl` among them.
    pickles: Vec<String>,
}

impl Archive {
    /// Opens `path` as a zip archive and finds its one `data.pkl`.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path, crate::files::FileKind::Weights)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(corrupt(path, "the file is empty"));
        }
        let zip = match zip::ZipArchive::new(BufReader::new(file)) {
            Ok(zip) => zip,
            Err(e) => return Err(corrupt(path, not_a_zip_reason(path, &e))),
        };

        let pickles: Vec<String> = zip
            .file_names_raw()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| n.ends_with(".pkl"))
            .collect();
        let data_pkls: Vec<&String> = pickles.iter().filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl")).collect();
        let data_pkl = match data_pkls.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(corrupt(
                    path,
                    "the zip archive has no data.pkl: it is not a checkpoint written by torch.save",
                ))
            }
            several => return Err(corrupt(path, format!("the zip archive has several data.pkl ({several:?})"))),
        };
        let prefix = data_pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
        Ok(Self { path: path.to_path_buf(), zip, prefix, data_pkl, pickles })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn data_pkl(&self) -> &str {
        &self.data_pkl
    }

    pub(super) fn pickles(&self) -> &[String] {
        &self.pickles
    }

    /// Storages are raw bytes in the byte order of the machine that saved them: refuses any but
    /// little-endian (an archive without the `byteorder` record is little-endian).
    pub(super) fn check_byteorder(&mut self) -> Result<()> {
        let byteorder = format!("{}byteorder", self.prefix);
        if self.zip.index_for_name(&byteorder).is_some() {
            let order = self.read(&byteorder, 64)?;
            if order.trim_ascii() != b"little" {
                return Err(corrupt(
                    &self.path,
                    format!(
                        "its storages are {} (the `byteorder` record), only little-endian checkpoints are read",
                        String::from_utf8_lossy(order.trim_ascii())
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the storage `entry` is in the archive, uncompressed, with exactly the bytes of
    /// `numel` elements of `dtype`.
    pub(super) fn check_storage(&mut self, entry: &str, dtype: DType, numel: usize) -> Result<()> {
        let path = &self.path;
        let index = self
            .zip
            .index_for_name(entry)
            .ok_or_else(|| corrupt(path, format!("the storage {entry} of the pickle is missing from the archive")))?;
        let data = self.zip.by_index_data(index).map_err(|e| corrupt(path, format!("{entry}: {e}")))?;
        if data.compression() != zip::CompressionMethod::Stored {
            return Err(corrupt(
                path,
                format!("{entry} is compressed ({}), torch.save stores storages uncompressed", data.compression()),
            ));
        }
        let expected = (numel as u64).checked_mul(dtype.size_in_bytes() as u64);
        if expected != Some(data.size()) {
            return Err(corrupt(
                path,
                format!("{entry} holds {} bytes, but the pickle declares {numel} elements of {dtype:?}", data.size()),
            ));
        }
        Ok(())
    }

    /// Where `entry` lies in the archive (`usize::MAX` when it is not there), so that storages can
    /// be read in one sequential pass over the file.
    pub(super) fn position(&self, entry: &str) -> usize {
        self.zip.index_for_name(entry).unwrap_or(usize::MAX)
    }

    /// Reads a whole entry, checking its CRC, refusing more than `limit` bytes.
    pub(super) fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let path = &self.path;
        let index = self
            .zip
            .index_for_name(name)
            .ok_or_else(|| corrupt(path, format!("{name} is missing from the archive")))?;
        let (size, crc, stored) = {
            let entry = self.zip.by_index_data(index).map_err(|e| corrupt(path, format!("{name}: {e}")))?;
            (entry.size(), entry.crc32(), entry.compression() == zip::CompressionMethod::Stored)
        };
        if size > limit {
            return Err(corrupt(path, format!("{name} is implausibly large ({size} bytes)")));
        }
        // torch.save with `set_crc32_options(False)` writes a zero CRC: read such stored entries raw.
        let reader =
            if crc == 0 && size > 0 && stored { self.zip.by_index_raw(index) } else { self.zip.by_index(index) };
        let reader = reader.map_err(|e| corrupt(path, format!("{name}: {e}")))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(size as usize)
            .map_err(|e| corrupt(path, format!("{name}: cannot allocate {size} bytes: {e}")))?;
        reader
            .take(size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt(path, format!("{name}: {e}")))?;
        if bytes.len() as u64 != size {
            return Err(corrupt(path, format!("{name} has {} bytes where the archive declares {size}", bytes.len())));
        }
        Ok(bytes)
    }
}

/// What a file that is not a zip archive is, as far as its first bytes tell.
fn not_a_zip_reason(path: &Path, e: &zip::result::ZipError) -> String {
    const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    let mut head = [0u8; 64];
    let n = File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    let head = &head[..n];
    if head.starts_with(b"version https://git-lfs") {
        "it is a Git LFS pointer file, not the weights: fetch the LFS object (git lfs pull) or download the file itself"
            .into()
    } else if head.starts_with(LEGACY_MAGIC) {
        "it is in the legacy (PyTorch < 1.6) torch.save format, which t2v does not read: \
         re-save it with a current torch.save, or convert it to safetensors"
            .into()
    } else if head.starts_with(b"PK") {
        format!("the zip archive is truncated or damaged ({e})")
    } else if head.trim_ascii_start().starts_with(b"<") {
        format!("it looks like an HTML or XML page, not a torch.save zip archive ({e})")
    } else {
        format!("not a torch.save zip archive ({e})")
    }
}
