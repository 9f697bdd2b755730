//! ROCm without an AMD GPU: `--backend rocm` loads the real HIP runtime (Debian's libamdhip64,
//! installed by .ci/run) and exits with a clear message (library, version, "no ROCm device");
//! without the library, the message lists the paths tried. Never a panic.
mod common;

use common::*;

#[test]
fn rocm_without_a_device_says_so() {
    let o = engine().args(["serve", "--backend", "rocm", "--port", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    let installed = ["/usr/lib/x86_64-linux-gnu/libamdhip64.so.5", "/opt/rocm/lib/libamdhip64.so"].iter().any(|p| std::path::Path::new(p).exists());
    if installed {
        assert!(e.contains("libamdhip64") && e.contains("version") && e.contains("no ROCm device"), "{e}");
    } else {
        assert!(e.contains("libamdhip64") && e.contains("tried"), "{e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn missing_runtime_lists_the_paths_tried() {
    let o = engine().env("ENGINE_HIP_LIB", "/nonexistent/libamdhip64.so").args(["generate", "--backend", "rocm", "--input-ids", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("tried: /nonexistent/libamdhip64.so"), "{e}");
}
