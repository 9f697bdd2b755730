//! The kernel manifest embedded by build.rs: every file of hip-kernels/ and cuda-kernels/ with its
//! content hash. The GPU backends compile from these sources at run time (JIT) and key the kernel
//! cache on the hashes.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Source of an embedded kernel file by its path relative to the repository root.
pub fn source(path: &str) -> Option<&'static str> {
    KERNEL_FILES.iter().find(|(p, _, _)| *p == path).map(|(_, _, s)| *s)
}
