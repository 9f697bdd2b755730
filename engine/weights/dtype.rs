//! Element types found in DeepSeek checkpoints and their conversion to f32.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// OCP float8 e4m3fn (no infinities, 0x7f/0xff are NaN, max 448).
    F8E4M3,
}

impl DType {
    pub fn from_safetensors(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8E4M3,
            _ => return None,
        })
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }
}

#[inline]
pub fn bf16_to_f32(lo: u8, hi: u8) -> f32 {
    f32::from_bits(((hi as u32) << 24) | ((lo as u32) << 16))
}

#[inline]
pub fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

const fn fp8_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // subnormal: man/8 * 2^-6
        return sign * man * (1.0 / 512.0);
    }
    // normal: (1 + man/8) * 2^(exp-7)
    let mut scale = 1.0f32;
    let mut e = exp - 7;
    while e > 0 {
        scale *= 2.0;
        e -= 1;
    }
    while e < 0 {
        scale *= 0.5;
        e += 1;
    }
    sign * (1.0 + man / 8.0) * scale
}

const fn fp8_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = fp8_decode(i as u8);
        i += 1;
    }
    t
}

static FP8_E4M3FN: [f32; 256] = fp8_table();

#[inline]
pub fn fp8_e4m3fn_to_f32(b: u8) -> f32 {
    FP8_E4M3FN[b as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_known_values() {
        assert_eq!(fp8_e4m3fn_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3fn_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3fn_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3fn_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3fn_to_f32(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3fn_to_f32(0x7f).is_nan() && fp8_e4m3fn_to_f32(0xff).is_nan());
        // monotone over the positive codes
        for b in 1..0x7eu8 {
            assert!(fp8_e4m3fn_to_f32(b + 1) > fp8_e4m3fn_to_f32(b));
        }
    }

    #[test]
    fn bf16_and_f16() {
        let x = half::bf16::from_f32(-3.140625);
        let [lo, hi] = x.to_bits().to_le_bytes();
        assert_eq!(bf16_to_f32(lo, hi), -3.140625);
        let y = half::f16::from_f32(0.333_251_95);
        let [lo, hi] = y.to_bits().to_le_bytes();
        assert_eq!(f16_to_f32(lo, hi), 0.333_251_95);
    }
}
