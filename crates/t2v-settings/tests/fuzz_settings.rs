//! Property tests over settings records (issue 11): any text given as a settings file, or any
//! value in a record's fields, is either refused or gives parameters that the library's checks
//! then accept or refuse; nothing panics. Case counts are fixed to keep the suite fast.

use proptest::prelude::*;
use serde_json::{json, Value};
use t2v::pipeline::{validate_params, GenerationParams};
use t2v_settings::RunSettings;

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..64).prop_map(Value::from),
        prop::sample::select(vec![1_000_000_000_000u64, u64::MAX, 1 << 40, 4294967295]).prop_map(Value::from),
        (-3i64..0).prop_map(Value::from),
        prop::sample::select(vec![0.5, 1e300, -1e300, 9.0, 1e13]).prop_map(|v: f64| json!(v)),
        prop::sample::select(vec!["NaN", "ddim", "dpm", "f16", "bf16", "x"]).prop_map(Value::from),
        Just(Value::Null),
    ]
}

const FIELDS: &[&str] = &[
    "seed",
    "steps",
    "guidance_scale",
    "eta",
    "num_frames",
    "height",
    "width",
    "fps",
    "scheduler",
    "dtype",
    "negative_prompt",
    "input",
    "upscale",
];

/// Checks what a record gives, as `t2v generate --from` does before any work.
fn check(settings: &RunSettings) {
    let mut params = GenerationParams::new("", 0);
    if settings.apply_to(&mut params).is_ok() {
        let _ = validate_params(&params, settings.height, settings.width, 8);
    }
    let _ = settings.dtype();
    let again: RunSettings = serde_json::from_str(&settings.to_json()).expect("a record reads back");
    assert_eq!(again.num_frames, settings.num_frames);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    /// A valid record with fields replaced by hostile values.
    #[test]
    fn records_with_hostile_fields(fields in prop::collection::vec((prop::sample::select(FIELDS), number()), 0..6)) {
        let mut record = json!({
            "t2v_version": "0.1.0", "model": "m", "prompt": "a cat", "seed": 1, "steps": 2, "scheduler": "ddim",
            "guidance_scale": 9.0, "num_frames": 2, "height": 32, "width": 32,
        });
        for (k, v) in fields {
            record[k] = v;
        }
        if let Ok(settings) = serde_json::from_value::<RunSettings>(record) {
            check(&settings);
        }
    }

    /// Any text as a settings file, read through the bounded reader.
    #[test]
    fn any_text_as_a_settings_file(text in "[-{}\":,0-9a-z_. \\[\\]]{0,120}", bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.json");
        std::fs::write(&path, &text).unwrap();
        if let Ok(settings) = RunSettings::read(&path) {
            check(&settings);
        }
        // And any bytes as an MP4 carrying settings.
        let mp4 = tmp.path().join("v.mp4");
        std::fs::write(&mp4, &bytes).unwrap();
        if let Ok(settings) = RunSettings::read(&mp4) {
            check(&settings);
        }
    }
}
