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
}
