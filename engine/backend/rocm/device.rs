//! What a ROCm device must be for the engine's kernels: a CDNA3/CDNA4 arch (gfx942 MI300X/MI325X,
//! gfx950 MI355X) from its gcnArchName, 64-wide wavefronts, and the FP8 format the arch computes
//! in (gfx942: e4m3fnuz, so e4m3fn checkpoints are converted at load; gfx950: OCP e4m3fn as stored).

/// FP8 e4m3 flavour of an arch's matrix units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    /// OCP e4m3fn (NaN 0x7f/0xff, max 448): the checkpoints' format
    E4m3Fn,
    /// e4m3fnuz (NaN 0x80 only, bias 8, max 240): gfx942
    E4m3Fnuz,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmdArch {
    /// "gfx942" or "gfx950": the --offload-arch / hipRTC target
    pub target: &'static str,
    pub fp8: Fp8Format,
    /// The wavefront width the kernels are compiled for (ENGINE_WARP_SIZE)
    pub wave: u32,
}

/// The arch of a device from its gcnArchName ("gfx942:sramecc+:xnack-"); other archs are refused
/// with a message naming the device's arch and the supported ones.
pub fn arch_from_gcn_name(gcn: &str) -> Result<AmdArch, String> {
    let base = gcn.split(':').next().unwrap_or("").trim();
    match base {
        "gfx942" => Ok(AmdArch { target: "gfx942", fp8: Fp8Format::E4m3Fnuz, wave: 64 }),
        "gfx950" => Ok(AmdArch { target: "gfx950", fp8: Fp8Format::E4m3Fn, wave: 64 }),
        "" => Err("the ROCm device reports an empty gcnArchName".into()),
        other => Err(format!("ROCm device arch {other} ({gcn}) is not supported: the kernels target gfx942 (MI300X/MI325X) and gfx950 (MI355X)")),
    }
}

/// The device's reported warp size must be the arch's wavefront width: the kernels' reductions and
/// the MFMA fragment layouts are compiled for it.
pub fn check_wave(arch: &AmdArch, reported: i32) -> Result<(), String> {
    if reported as u32 != arch.wave {
        return Err(format!("ROCm device {} reports a warp size of {reported}, but {} kernels are built for {}-wide wavefronts", arch.target, arch.target, arch.wave));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdna3_and_cdna4_are_accepted_with_their_fp8_format() {
        let a = arch_from_gcn_name("gfx942:sramecc+:xnack-").unwrap();
        assert_eq!((a.target, a.fp8, a.wave), ("gfx942", Fp8Format::E4m3Fnuz, 64));
        let b = arch_from_gcn_name("gfx950").unwrap();
        assert_eq!((b.target, b.fp8), ("gfx950", Fp8Format::E4m3Fn));
    }

    #[test]
    fn other_archs_and_wave_sizes_are_clear_errors() {
        let e = arch_from_gcn_name("gfx90a:sramecc+:xnack-").unwrap_err();
        assert!(e.contains("gfx90a") && e.contains("gfx942") && e.contains("gfx950"), "{e}");
        assert!(arch_from_gcn_name("").unwrap_err().contains("empty"));
        let a = arch_from_gcn_name("gfx942").unwrap();
        assert!(check_wave(&a, 64).is_ok());
        let e = check_wave(&a, 32).unwrap_err();
        assert!(e.contains("32") && e.contains("64"), "{e}");
    }
}
