//! FP8 for MI300X (gfx942): its matrix cores read e4m3**fnuz** (exponent bias 8, no negative zero,
//! 0x80 is NaN, max 240), while checkpoints hold OCP e4m3**fn** (bias 7, max 448). The same bits
//! read as fnuz are worth half as much, so a weight is converted by keeping its bits, turning 0x80
//! (fn's -0, fnuz's NaN) into 0x00, and doubling its block scales (as vLLM/SGLang do at load).
//! gfx950 (MI355X) keeps OCP e4m3fn.

/// float8 e4m3fnuz → f32 (an implementation independent of the fn decoder).
pub fn fp8_e4m3fnuz_to_f32(b: u8) -> f32 {
    if b == 0x80 {
        return f32::NAN;
    }
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    let mag = if e == 0 { (m / 8.0) * 2f32.powi(1 - 8) } else { (1.0 + m / 8.0) * 2f32.powi(e - 8) };
    sign * mag
}

/// Converts e4m3fn weight bytes to e4m3fnuz in place; the caller doubles the block scales.
pub fn e4m3fn_to_e4m3fnuz(w: &mut [u8]) {
    for b in w {
        if *b == 0x80 {
            *b = 0;
        }
    }
}

/// Block scales of a converted weight.
pub fn fnuz_scales(scale_inv: &mut [f32]) {
    scale_inv.iter_mut().for_each(|s| *s *= 2.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::fp8_e4m3fn_to_f32;

    /// Every one of the 256 byte values: value(fnuz bits) × 2 == value(fn bits), bit-exactly, except
    /// fn's NaNs (never in weights) and -0, which becomes +0.
    #[test]
    fn all_256_bytes_convert_exactly() {
        for b in 0..=255u8 {
            let fn_val = fp8_e4m3fn_to_f32(b);
            let mut w = [b];
            e4m3fn_to_e4m3fnuz(&mut w);
            let fnuz_val = fp8_e4m3fnuz_to_f32(w[0]);
            if fn_val.is_nan() {
                assert!(b == 0x7f || b == 0xff);
                continue;
            }
            assert!(!fnuz_val.is_nan(), "byte {b:#04x} became NaN");
            assert_eq!((fnuz_val * 2.0).to_bits() & 0x7fff_ffff, fn_val.to_bits() & 0x7fff_ffff, "byte {b:#04x}: {fn_val} vs 2 x {fnuz_val}");
            if fn_val != 0.0 {
                assert_eq!(fnuz_val.is_sign_negative(), fn_val.is_sign_negative());
            }
        }
        assert_eq!(fp8_e4m3fnuz_to_f32(0x7f), 240.0, "fnuz max");
        assert_eq!(fp8_e4m3fn_to_f32(0x7e), 448.0, "fn max");
        let mut z = [0x80u8];
        e4m3fn_to_e4m3fnuz(&mut z);
        assert_eq!(z[0], 0x00, "negative zero becomes zero, not NaN");
    }

    #[test]
    fn scales_double() {
        let mut s = [0.5f32, 3.0];
        fnuz_scales(&mut s);
        assert_eq!(s, [1.0, 6.0]);
    }
}
