//! Tests of the `.bin` (torch.save zip) reader: fixtures against their safetensors twins, the
//! malicious pickle, damaged files, and hand-made archives for the cases the fixtures lack.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use t2v::checkpoint::pth::{check_pth_is_plain_state_dict, load_pth_tensors, var_builder_from_pth};
use t2v::error::Error;
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

const PAIRS: &[(&str, &str)] = &[
    ("text_encoder/pytorch_model.bin", "text_encoder/model.safetensors"),
    ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"),
    ("vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors"),
];

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn assert_corrupt(result: t2v::error::Result<impl Sized>, needle: &str) {
    match result {
        Err(e @ Error::CorruptWeights { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`");
        }
        Err(other) => panic!("expected CorruptWeights ({needle}), got {other:?}"),
        Ok(_) => panic!("expected CorruptWeights ({needle}), got Ok"),
    }
}

#[test]
fn fixture_bins_equal_their_safetensors() {
    for (bin, st) in PAIRS {
        let bin = fixtures().join("tiny-t2v-bin").join(bin);
        let st = fixtures().join("tiny-t2v").join(st);
        check_pth_is_plain_state_dict(&bin).unwrap();
        let from_bin = load_pth_tensors(&bin, DType::F32, &Device::Cpu).unwrap();
        let from_st: HashMap<String, Tensor> = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        let mut a: Vec<_> = from_bin.keys().collect();
        let mut b: Vec<_> = from_st.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{}: tensor names differ", bin.display());
        for (name, expected) in &from_st {
            let got = &from_bin[name];
            assert_eq!(got.dtype(), expected.dtype(), "{name}");
            assert_eq!(got.dims(), expected.dims(), "{name}");
            assert_eq!(bits(got), bits(expected), "{name}: values differ");
        }
    }
}

#[test]
fn var_builder_reads_fixture_and_converts_dtype() {
    let bin = fixtures().join("tiny-t2v-bin/vae/diffusion_pytorch_model.bin");
    let st = fixtures().join("tiny-t2v/vae/diffusion_pytorch_model.safetensors");
    let reference = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = "encoder.conv_in.weight";
    let w = &reference[name];

    let vb = var_builder_from_pth(&bin, DType::F32, &Device::Cpu).unwrap();
    let got = vb.pp("encoder").pp("conv_in").get(w.dims(), "weight").unwrap();
    assert_eq!(bits(&got), bits(w));
    assert!(vb.get(w.dims(), "no.such.tensor").is_err());

    let vb = var_builder_from_pth(&bin, DType::F16, &Device::Cpu).unwrap();
    let got = vb.get(w.dims(), name).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    assert_eq!(
        bits(&got.to_dtype(DType::F32).unwrap()),
        bits(&w.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap())
    );
}

#[test]
fn malicious_pickle_is_refused_and_runs_nothing() {
    let marker = Path::new("t2v-pickle-ran.txt");
    assert!(!marker.exists(), "{} exists before the test: remove it", marker.display());
    let path = fixtures().join("malicious.bin");
    for result in [
        check_pth_is_plain_state_dict(&path).map(|_| ()),
        load_pth_tensors(&path, DType::F32, &Device::Cpu).map(|_| ()),
        var_builder_from_pth(&path, DType::F32, &Device::Cpu).map(|_| ()),
    ] {
        match result {
            Err(e @ Error::UnsafePickle { .. }) => {
                let Error::UnsafePickle { global, .. } = &e else { unreachable!() };
                assert_eq!(global, "posix.system");
                assert!(e.to_string().contains("`posix.system`"), "{e}");
            }
            other => panic!("expected UnsafePickle, got {other:?}"),
        }
    }
    assert!(!marker.exists(), "the pickle's payload ran: {} appeared", marker.display());
}

#[test]
fn truncated_garbage_and_other_non_checkpoints_are_corrupt() {
    let dir = TempDir::new().unwrap();
    let original = std::fs::read(fixtures().join("tiny-t2v-bin/unet/diffusion_pytorch_model.bin")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("half.bin", original[..original.len() / 2].to_vec(), "truncated or damaged"),
        ("almost.bin", original[..original.len() - 10].to_vec(), "truncated or damaged"),
        (
            "garbage.bin",
            (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
            "not a torch.save",
        ),
        ("empty.bin", vec![], "empty"),
        ("lfs.bin", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123\n".to_vec(), "Git LFS"),
        (
            "legacy.bin",
            b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.".to_vec(),
            "legacy",
        ),
        ("page.bin", b"<!DOCTYPE html><html>Not found</html>".to_vec(), "HTML"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        assert_corrupt(check_pth_is_plain_state_dict(&path), needle);
        assert_corrupt(var_builder_from_pth(&path, DType::F32, &Device::Cpu), needle);
    }
    match check_pth_is_plain_state_dict(&dir.path().join("does-not-exist.bin")) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected Io, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Hand-made archives

/// A protocol-2 pickle, written opcode by opcode.
struct P(Vec<u8>);

impl P {
    fn new() -> Self {
        P(vec![0x80, 2])
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.raw(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.raw(b"X").raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.raw(b"J").raw(&v.to_le_bytes())
    }
    fn ints(&mut self, v: &[usize]) -> &mut Self {
        self.raw(b"(");
        for &x in v {
            self.int(x as i32);
        }
        self.raw(b"t")
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
    fn tensor(
        &mut self,
        ty: &str,
        key: &str,
        numel: usize,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").raw(b"((");
        self.str("storage").global("torch", ty).str(key).str("cpu").int(numel as i32).raw(b"tQ");
        self.int(offset as i32).ints(size).ints(stride);
        self.raw(b"\x89").global("collections", "OrderedDict").raw(b")Rt").raw(b"R")
    }
    fn stop(&mut self) -> Vec<u8> {
        self.raw(b".");
        self.0.clone()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_pth(dir: &TempDir, name: &str, pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> PathBuf {
    let path = dir.path().join(name);
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
    path
}

#[test]
fn views_shared_storage_wrappers_and_nested_state_dict() {
    let dir = TempDir::new().unwrap();
    let data = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
    let mut p = P::new();
    p.raw(b"}(").str("state_dict").raw(b"}(");
    // Transposed view of a (2,3) matrix, a strided slice, the whole storage, a scalar.
    p.str("t").tensor("FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]);
    p.str("s").tensor("FloatStorage", "0", 6, 2, &[2], &[2]);
    p.str("m").tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
    p.str("scalar").tensor("FloatStorage", "0", 6, 5, &[], &[]);
    // keep_vars=True: a Parameter.
    p.str("p").global("torch._utils", "_rebuild_parameter").raw(b"(");
    p.tensor("FloatStorage", "0", 6, 3, &[3], &[1])
        .raw(b"\x88")
        .global("collections", "OrderedDict")
        .raw(b")Rt")
        .raw(b"R");
    p.str("ids").tensor("LongStorage", "1", 2, 0, &[2], &[1]);
    p.raw(b"u"); // end of the inner dict
    p.str("epoch").int(3);
    let pickle = p.raw(b"u").stop();
    let ids: Vec<u8> = [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let path = write_pth(&dir, "views.bin", &pickle, &[("0", data), ("1", ids)]);

    check_pth_is_plain_state_dict(&path).unwrap();
    let t = load_pth_tensors(&path, DType::F32, &Device::Cpu).unwrap();
    let mut names: Vec<_> = t.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["ids", "m", "p", "s", "scalar", "t"]);
    assert_eq!(t["t"].to_vec2::<f32>().unwrap(), [[0., 3.], [1., 4.], [2., 5.]]);
    assert_eq!(t["s"].to_vec1::<f32>().unwrap(), [2., 4.]);
    assert_eq!(t["m"].to_vec2::<f32>().unwrap(), [[0., 1., 2.], [3., 4., 5.]]);
    assert_eq!(t["scalar"].to_scalar::<f32>().unwrap(), 5.);
    assert_eq!(t["p"].to_vec1::<f32>().unwrap(), [3., 4., 5.]);
    // Integer tensors keep their dtype, floats take the requested one.
    let t = load_pth_tensors(&path, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(t["ids"].dtype(), DType::I64);
    assert_eq!(t["ids"].to_vec1::<i64>().unwrap(), [7, -1]);
    assert_eq!(t["m"].dtype(), DType::BF16);
}

/// What Python's pickle (protocol 2, as torch.save) writes for a `Module.state_dict()`: an
/// OrderedDict carrying `_metadata` (a BUILD), tensors saved from CUDA, a Parameter
/// (`keep_vars=True`), a float16 storage and a transposed view sharing a storage. Generated by
/// pickling stand-ins registered under torch's module names (no torch needed to regenerate).
#[test]
fn state_dict_as_python_pickles_it() {
    let dir = TempDir::new().unwrap();
    let pickle: Vec<u8> = [
        b"\x80\x02ccollections\x0aOrderedDict\x0aq\x00)Rq\x01(X\x08\x00\x00\x00a.weightq".as_slice(),
        b"\x02ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x03((X\x07\x00\x00\x00stora".as_slice(),
        b"geq\x04ctorch\x0aFloatStorage\x0aq\x05X\x01\x00\x00\x000q\x06X\x06\x00\x00\x00cuda:0q\x07K".as_slice(),
        b"\x06tq\x08QK\x00K\x02K\x03\x86q\x09K\x03K\x01\x86q\x0a\x89h\x00)Rq\x0btq\x0cRq\x0dX\x0a\x00\x00\x00a.weight_".as_slice(),
        b"tq\x0eh\x03((h\x04h\x05h\x06h\x07K\x06tq\x0fQK\x00K\x03K\x02\x86q\x10K\x01K\x03\x86q\x11\x89h\x00)Rq\x12tq\x13R".as_slice(),
        b"q\x14X\x06\x00\x00\x00b.biasq\x15ctorch._utils\x0a_rebuild_parameter\x0a".as_slice(),
        b"q\x16h\x03((h\x04ctorch\x0aHalfStorage\x0aq\x17X\x01\x00\x00\x001q\x18h\x07K\x03tq\x19QK\x00K".as_slice(),
        b"\x03\x85q\x1aK\x01\x85q\x1b\x89h\x00)Rq\x1ctq\x1dRq\x1e\x88h\x00)Rq\x1f\x87q Rq!u}q\x22X\x09\x00\x00\x00_met".as_slice(),
        b"adataq#h\x00)Rq$(X\x00\x00\x00\x00q%}q&X\x07\x00\x00\x00versionq'K\x01sX\x01\x00\x00\x00aq".as_slice(),
        b"(}q)h'K\x02susb.".as_slice(),
    ]
    .concat();
    let s0 = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
    let s1: Vec<u8> = [0x3800u16, 0xc000, 0x7bff].iter().flat_map(|x| x.to_le_bytes()).collect();
    let path = write_pth(&dir, "python-state-dict.bin", &pickle, &[("0", s0), ("1", s1)]);
    let t = load_pth_tensors(&path, DType::F32, &Device::Cpu).unwrap();
    let mut names: Vec<_> = t.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["a.weight", "a.weight_t", "b.bias"], "`_metadata` is not a tensor");
    assert_eq!(t["a.weight"].to_vec2::<f32>().unwrap(), [[0., 1., 2.], [3., 4., 5.]]);
    assert_eq!(t["a.weight_t"].to_vec2::<f32>().unwrap(), [[0., 3.], [1., 4.], [2., 5.]]);
    assert_eq!(t["b.bias"].to_vec1::<f32>().unwrap(), [0.5, -2.0, 65504.0]);
    let t = load_pth_tensors(&path, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(t["b.bias"].dtype(), DType::F16);
}

#[test]
fn other_forbidden_globals_are_named() {
    let dir = TempDir::new().unwrap();
    // A proto-4 pickle: STACK_GLOBAL through memoized strings.
    let mut p = b"\x80\x04\x95\x30\x00\x00\x00\x00\x00\x00\x00".to_vec();
    p.extend_from_slice(b"\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x0a__import__\x94\x85\x94R\x94.");
    let path = write_pth(&dir, "stack-global.bin", &p, &[]);
    match check_pth_is_plain_state_dict(&path) {
        Err(Error::UnsafePickle { global, .. }) => assert_eq!(global, "builtins.eval"),
        other => panic!("expected UnsafePickle, got {other:?}"),
    }
    // A name in the torch module that is not a storage type.
    let pickle = P::new().raw(b"}").str("w").tensor("load", "0", 1, 0, &[1], &[1]).raw(b"s").stop();
    let path = write_pth(&dir, "torch-load.bin", &pickle, &[("0", f32_bytes(&[1.]))]);
    match load_pth_tensors(&path, DType::F32, &Device::Cpu) {
        Err(Error::UnsafePickle { global, .. }) => assert_eq!(global, "torch.load"),
        other => panic!("expected UnsafePickle, got {other:?}"),
    }
    // Tensor storage candle cannot represent (int8) is not unsafe, but cannot be loaded.
    let pickle = P::new().raw(b"}").str("w").tensor("CharStorage", "0", 1, 0, &[1], &[1]).raw(b"s").stop();
    let path = write_pth(&dir, "int8.bin", &pickle, &[("0", vec![1u8])]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "CharStorage");
}

#[test]
fn inconsistent_archives_are_corrupt() {
    let dir = TempDir::new().unwrap();
    let tensor = |numel, offset, size: &[usize], stride: &[usize]| {
        P::new().raw(b"}").str("w").tensor("FloatStorage", "0", numel, offset, size, stride).raw(b"s").stop()
    };
    let four = f32_bytes(&[1., 2., 3., 4.]);
    // A view past the end of its storage.
    let path = write_pth(&dir, "past-end.bin", &tensor(4, 2, &[3], &[1]), &[("0", four.clone())]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "past the end");
    // A storage whose bytes do not match its declared size.
    let path = write_pth(&dir, "short-storage.bin", &tensor(4, 0, &[4], &[1]), &[("0", four[..12].to_vec())]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "declares 4 elements");
    // A missing storage.
    let path = write_pth(&dir, "no-storage.bin", &tensor(4, 0, &[4], &[1]), &[]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "missing");
    // A pickle cut short, inside a sound zip.
    let full = tensor(4, 0, &[4], &[1]);
    let path = write_pth(&dir, "cut-pickle.bin", &full[..full.len() / 2], &[("0", four.clone())]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "truncated pickle");
    // Not a state dict at all.
    let path = write_pth(&dir, "list.bin", &P::new().raw(b"]").stop(), &[]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "not a state dict");
    // A dict without tensors.
    let path = write_pth(&dir, "no-tensors.bin", &P::new().raw(b"}").str("model").raw(b"}s").stop(), &[]);
    assert_corrupt(check_pth_is_plain_state_dict(&path), "no tensors");
    // A flipped byte in a storage: caught by the zip's CRC when the tensors are read.
    let marker = f32_bytes(&[1234.5, 1234.5, 1234.5, 1234.5]);
    let path = write_pth(&dir, "flipped.bin", &tensor(4, 0, &[4], &[1]), &[("0", marker.clone())]);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(16).position(|w| w == marker.as_slice()).unwrap();
    bytes[at + 5] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    check_pth_is_plain_state_dict(&path).unwrap(); // metadata is intact
    assert_corrupt(load_pth_tensors(&path, DType::F32, &Device::Cpu), "checksum");
    // No data.pkl.
    let path = dir.path().join("no-pickle.bin");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    z.start_file("archive/version", zip::write::SimpleFileOptions::default()).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
    assert_corrupt(check_pth_is_plain_state_dict(&path), "no data.pkl");
}

/// Thousands of damaged pickles (flipped bytes, cuts) inside sound archives: errors, never a panic.
#[test]
fn damaged_pickles_never_panic() {
    let dir = TempDir::new().unwrap();
    let original = fixtures().join("tiny-t2v-bin/vae/diffusion_pytorch_model.bin");
    let mut z = zip::ZipArchive::new(std::fs::File::open(&original).unwrap()).unwrap();
    let mut entries = vec![];
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let mut bytes = vec![];
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        entries.push((f.name().unwrap().to_string(), bytes));
    }
    let pkl = entries.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let clean = entries[pkl].1.clone();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let path = dir.path().join("damaged.bin");
    let (mut refused, mut loaded) = (0, 0);
    for case in 0..600 {
        let mut pickle = clean.clone();
        match case % 3 {
            0 => pickle.truncate(rand(clean.len())),
            1 => {
                for _ in 0..1 + rand(3) {
                    let at = rand(pickle.len());
                    pickle[at] = rand(256) as u8;
                }
            }
            _ => {
                let at = rand(pickle.len());
                pickle[at] ^= 1 << rand(8);
            }
        }
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        for (i, (name, bytes)) in entries.iter().enumerate() {
            w.start_file(name, opts).unwrap();
            w.write_all(if i == pkl { &pickle } else { bytes }).unwrap();
        }
        w.finish().unwrap();
        match load_pth_tensors(&path, DType::F32, &Device::Cpu) {
            Ok(_) => loaded += 1,
            Err(Error::CorruptWeights { .. } | Error::UnsafePickle { .. }) => refused += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    eprintln!("{refused} refused, {loaded} loaded");
    assert!(refused > 300, "{refused} refused, {loaded} loaded");
}
