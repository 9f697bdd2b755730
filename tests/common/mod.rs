//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]
pub mod gpu;
pub mod server;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (ENGINE_REPO_DIR overrides it when test binaries run on another machine).
pub fn repo_dir() -> PathBuf {
    std::env::var_os("ENGINE_REPO_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn engine() -> Command {
    let bin = std::env::var_os("ENGINE_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_engine")));
    let mut c = Command::new(bin);
    c.env("ENGINE_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    engine().args(args).output().expect("run engine")
}

pub fn golden_dir(name: &str) -> PathBuf {
    repo_dir().join("tests/golden/data").join(name)
}

/// A fresh temporary folder, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("engine-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

pub fn stdout_json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "engine failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// Runs a GPU test body on the backend ENGINE_TEST_BACKEND names (`cuda` or `rocm`): the same
/// generic test covers both vendors' `GpuBackend`.
#[allow(unused_macros)]
macro_rules! on_gpu {
    ($f:ident) => {
        match std::env::var("ENGINE_TEST_BACKEND").as_deref() {
            Ok("cuda") => $f::<engine::backend::cuda::Cuda>(),
            Ok("rocm") => $f::<engine::backend::rocm::Rocm>(),
            v => panic!("GPU tests run with ENGINE_TEST_BACKEND=cuda or rocm on a machine with that GPU (got {v:?})"),
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_gpu;
