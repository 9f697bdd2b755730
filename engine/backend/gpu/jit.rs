//! JIT: a kernel module's binary from the cache, or compiled and stored. Logs compile time and
//! cache hits, and counts both (a second start with a warm cache compiles nothing).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::kernel_cache::EntryMeta;
use super::source::{assemble, Vendor};
use super::{CompileError, KernelCache, KernelCompiler, KernelModule};

pub struct Jit {
    pub cache: KernelCache,
    pub compiler: Box<dyn KernelCompiler>,
    vendor: Vendor,
    pub hits: AtomicUsize,
    pub compiles: AtomicUsize,
}

impl Jit {
    pub fn new(cache: KernelCache, compiler: Box<dyn KernelCompiler>, vendor: Vendor) -> Self {
        Jit { cache, compiler, vendor, hits: AtomicUsize::new(0), compiles: AtomicUsize::new(0) }
    }

    pub fn binary(&self, m: &KernelModule) -> Result<Vec<u8>, CompileError> {
        let src = assemble(m.file, &m.defines, self.vendor).map_err(|log| CompileError::Failed {
            compiler: self.compiler.name(),
            file: m.file.into(),
            arch: self.compiler.arch().into(),
            log,
        })?;
        let key = KernelCache::key(&src, &self.compiler.options(), self.compiler.arch(), &self.compiler.version());
        if let Some(b) = self.cache.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            log::debug!("kernel cache hit: {} {:?} ({})", m.file, m.defines, &key[..12]);
            return Ok(b);
        }
        let t = Instant::now();
        let bin = self.compiler.compile(m.file, &src)?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        log::info!("compiled {} for {} in {:.2}s ({} bytes)", m.file, self.compiler.arch(), t.elapsed().as_secs_f64(), bin.len());
        let meta = EntryMeta {
            file: m.file.into(),
            arch: self.compiler.arch().into(),
            compiler: self.compiler.version(),
            defines: m.defines.clone(),
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        if let Err(e) = self.cache.put(&key, &meta, &bin) {
            log::warn!("cannot write the kernel cache at {}: {e}", self.cache.dir.display());
        }
        Ok(bin)
    }

    pub fn stats(&self) -> (usize, usize) {
        (self.hits.load(Ordering::Relaxed), self.compiles.load(Ordering::Relaxed))
    }
}
