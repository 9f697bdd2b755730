//! The kernel manifest embedded by build.rs: every file of hip-kernels/ and cuda-kernels/ with its
//! content hash. The GPU backends compile from these sources at run time (JIT) and key the kernel
//! cache on the hashes.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Source of an embedded kernel file by its path relative to the repository root.
pub fn source(path: &str) -> Option<&'static str> {
    KERNEL_FILES.iter().find(|(p, _, _)| *p == path).map(|(_, _, s)| *s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn manifest_hashes_match_embedded_sources() {
        for (path, hash, src) in super::KERNEL_FILES {
            let h = src.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            assert_eq!(h, *hash, "{path}");
            assert_eq!(super::source(path), Some(*src));
        }
    }

    /// The CUDA backend launches every kernel as a programmatic dependent of the one before it
    /// (common.h): a kernel that touched memory before ENGINE_GRID_DEP() could read its
    /// predecessor's output early, and one whose blocks all exited without it could complete before
    /// its predecessor, letting the next kernel through early. So it is the first statement of each.
    #[test]
    fn every_kernel_waits_for_its_predecessor_first() {
        let mut kernels = 0;
        for (path, _, src) in super::KERNEL_FILES.iter().filter(|(p, _, _)| p.ends_with(".hip")) {
            for (at, _) in src.match_indices("__global__") {
                let body = at + src[at..].find('{').unwrap() + 1;
                let first = src[body..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                let sig = &src[at..body];
                let sig = sig.find("__launch_bounds__(").and_then(|b| sig[b..].find(')').map(|e| &sig[b + e + 1..])).unwrap_or(sig);
                let name = sig.split('(').next().unwrap_or("").split_whitespace().last().unwrap_or("");
                assert!(first.starts_with("ENGINE_GRID_DEP();"), "{path}: kernel {name} does not begin with ENGINE_GRID_DEP();");
                kernels += 1;
            }
        }
        assert!(kernels >= 60, "{kernels} kernels found");
    }
}
