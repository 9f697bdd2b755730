//! float32 → float8 e4m3fn, round to nearest even, saturating at ±448.

pub fn f32_to_fp8_e4m3fn(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(448.0);
    if a < 2f32.powi(-6) {
        // subnormal: m × 2^-9; m == 8 rounds up into the smallest normal (0x08), which is right.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127 + 7;
    let man = bits & 0x7f_ffff;
    let mut m3 = man >> 20;
    let rem = man & 0xf_ffff;
    if rem > 0x8_0000 || (rem == 0x8_0000 && m3 & 1 == 1) {
        m3 += 1;
    }
    if m3 == 8 {
        m3 = 0;
        e += 1;
    }
    if e > 15 || (e == 15 && m3 > 6) {
        e = 15;
        m3 = 6;
    }
    sign | ((e as u8) << 3) | m3 as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::fp8_e4m3fn_to_f32;

    #[test]
    fn round_trips_every_code() {
        for b in 0..=255u8 {
            let v = fp8_e4m3fn_to_f32(b);
            if v.is_nan() {
                continue;
            }
            assert_eq!(f32_to_fp8_e4m3fn(v), b, "code {b:#x} value {v}");
        }
    }

    #[test]
    fn rounds_to_nearest() {
        // between 1.0 (0x38) and 1.125 (0x39): ties go to even (0x38)
        assert_eq!(f32_to_fp8_e4m3fn(1.0625), 0x38);
        assert_eq!(f32_to_fp8_e4m3fn(1.07), 0x39);
        assert_eq!(f32_to_fp8_e4m3fn(1000.0), 0x7e);
        assert_eq!(f32_to_fp8_e4m3fn(-1000.0), 0xfe);
    }
}
