//! Assembles one kernel translation unit from the embedded sources: the vendor prelude, the
//! JIT-time defines, then the file with each `#include "x.h"` replaced by that header's text (once).
//! The result is self-contained, so the cache key is simply its hash plus the compile settings.
use crate::kernels;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// NVRTC: cuda-kernels/hip_compat.cuh maps the HIP dialect onto CUDA.
    Nvidia,
    /// hipRTC: the HIP runtime header.
    Amd,
}

fn inline_includes(path: &str, out: &mut String, seen: &mut Vec<String>) -> Result<(), String> {
    let src = kernels::source(path).ok_or_else(|| format!("kernel source {path} is not in the manifest"))?;
    let dir = path.rsplit_once('/').map(|x| x.0).unwrap_or("");
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let name = rest.trim_end_matches('"');
            let inc = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
            if !seen.contains(&inc) {
                seen.push(inc.clone());
                inline_includes(&inc, out, seen)?;
            }
        } else if t == "#pragma once" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}

pub fn assemble(file: &str, defines: &[(String, String)], vendor: Vendor) -> Result<String, String> {
    let mut out = String::new();
    match vendor {
        Vendor::Nvidia => {
            let compat = "cuda-kernels/hip_compat.cuh";
            out.push_str(&format!("// ---- {compat}\n"));
            inline_includes(compat, &mut out, &mut vec![])?;
        }
        // hipRTC brings the HIP device headers itself (__HIPCC_RTC__); an offline clang compile
        // (the CI compile check) includes them.
        Vendor::Amd => out.push_str(
            "#ifndef __HIPCC_RTC__\n#include <hip/hip_runtime.h>\n#else\n\
             using __hip_internal::uint8_t; using __hip_internal::uint16_t; using __hip_internal::uint32_t;\n\
             using __hip_internal::uint64_t; using __hip_internal::int32_t; using __hip_internal::int64_t;\n#endif\n",
        ),
    }
    for (k, v) in defines {
        out.push_str(&format!("#define {k} {v}\n"));
    }
    out.push_str(&format!("// ---- {file}\n"));
    inline_includes(file, &mut out, &mut vec![])?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_inlined_once() {
        let s = assemble("hip-kernels/norm.hip", &[("ENGINE_WARP_SIZE".into(), "32".into())], Vendor::Nvidia).unwrap();
        assert!(s.contains("__shfl_xor_sync"), "compat header first");
        assert!(s.contains("#define ENGINE_WARP_SIZE 32"));
        assert_eq!(s.matches("float bf16_to_f32").count(), 1);
        assert!(!s.contains("#include \""));
        assert!(assemble("hip-kernels/nope.hip", &[], Vendor::Amd).is_err());
    }
}
