//! FP8 decoders and the e4m3fn → e4m3fnuz conversion (MI300X) against torch's own tables
//! (tests/fp8/torch_fp8_tables.json, written by torch.float8_e4m3fn / float8_e4m3fnuz).
use engine::weights::fnuz::{e4m3fn_to_e4m3fnuz, fp8_e4m3fnuz_to_f32};
use engine::weights::fp8_e4m3fn_to_f32;

fn table(name: &str) -> Vec<f32> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fp8/torch_fp8_tables.json")).unwrap()).unwrap();
    v[name].as_array().unwrap().iter().map(|x| if x.is_string() { f32::NAN } else { x.as_f64().unwrap() as f32 }).collect()
}

#[test]
fn decoders_match_torch_on_all_256_bytes() {
    let (fn_t, fnuz_t) = (table("e4m3fn"), table("e4m3fnuz"));
    for b in 0..=255u8 {
        let (a, t) = (fp8_e4m3fn_to_f32(b), fn_t[b as usize]);
        assert!(a == t || (a.is_nan() && t.is_nan()), "e4m3fn {b:#04x}: {a} vs torch {t}");
        let (a, t) = (fp8_e4m3fnuz_to_f32(b), fnuz_t[b as usize]);
        assert!(a == t || (a.is_nan() && t.is_nan()), "e4m3fnuz {b:#04x}: {a} vs torch {t}");
    }
}

#[test]
fn conversion_halves_every_value_exactly() {
    let (fn_t, fnuz_t) = (table("e4m3fn"), table("e4m3fnuz"));
    for b in 0..=255u8 {
        if fn_t[b as usize].is_nan() {
            continue;
        }
        let mut w = [b];
        e4m3fn_to_e4m3fnuz(&mut w);
        let (got, want) = (fnuz_t[w[0] as usize] * 2.0, fn_t[b as usize]);
        // -0 becomes +0 (0x80 is NaN in fnuz); everything else keeps its value under a doubled scale
        assert!(!got.is_nan() && got == want, "{b:#04x}: 2 x fnuz {got} vs fn {want}");
    }
}
