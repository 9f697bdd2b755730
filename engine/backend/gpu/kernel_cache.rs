//! The on-disk kernel cache (`ENGINE_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/engine/kernels`, else
//! `~/.cache/engine/kernels`). An entry's key hashes everything that decides the binary: the
//! assembled source (headers inlined, defines included), compiler options, target arch, compiler
//! version and the engine's kernel ABI version. Entries are written to a temporary file and
//! renamed, so concurrent engines never see half an entry; each entry carries its length and a
//! SHA-256 of its payload, so a corrupt or truncated one is detected, logged, removed and rebuilt.
//!
//! ```text
//!   entry file <key>.bin:  "ENGKC01\n" | u64 meta_len | u64 payload_len | sha256(payload) | meta JSON | payload
//! ```
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bump when kernel signatures or launch conventions change incompatibly.
pub const KERNEL_ABI_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"ENGKC01\n";

pub struct KernelCache {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EntryMeta {
    pub file: String,
    pub arch: String,
    pub compiler: String,
    pub defines: Vec<(String, String)>,
    pub created_unix: u64,
}

#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub key: String,
    pub bytes: u64,
    pub meta: Option<EntryMeta>,
}

pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ENGINE_KERNEL_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("engine/kernels");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/engine/kernels"),
        None => std::env::temp_dir().join("engine-kernels"),
    }
}

impl KernelCache {
    pub fn new(dir: PathBuf) -> Self {
        KernelCache { dir }
    }

    pub fn from_env() -> Self {
        Self::new(default_dir())
    }

    pub fn key(source: &str, options: &[String], arch: &str, compiler_version: &str) -> String {
        let mut h = Sha256::new();
        for part in [source.as_bytes(), options.join("\u{1}").as_bytes(), arch.as_bytes(), compiler_version.as_bytes(), &KERNEL_ABI_VERSION.to_le_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.bin"))
    }

    fn parse(bytes: &[u8]) -> Result<(EntryMeta, &[u8]), String> {
        if bytes.len() < 8 + 16 + 32 || &bytes[..8] != MAGIC {
            return Err("bad magic or truncated header".into());
        }
        let meta_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        let payload_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        let body = &bytes[56..];
        if body.len() != meta_len.saturating_add(payload_len) {
            return Err(format!("truncated: {} bytes after the header, expected {}", body.len(), meta_len.saturating_add(payload_len)));
        }
        let meta: EntryMeta = serde_json::from_slice(&body[..meta_len]).map_err(|e| format!("bad metadata: {e}"))?;
        let payload = &body[meta_len..];
        if Sha256::digest(payload).as_slice() != &bytes[24..56] {
            return Err("checksum mismatch".into());
        }
        Ok((meta, payload))
    }

    /// The cached binary, or None (absent, or corrupt: then it is logged and removed).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let p = self.path(key);
        let bytes = std::fs::read(&p).ok()?;
        match Self::parse(&bytes) {
            Ok((_, payload)) => Some(payload.to_vec()),
            Err(e) => {
                log::warn!("kernel cache entry {} is corrupt ({e}); removing it and rebuilding", p.display());
                let _ = std::fs::remove_file(&p);
                None
            }
        }
    }

    /// Stores an entry atomically (temporary file, then rename).
    pub fn put(&self, key: &str, meta: &EntryMeta, payload: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let meta_json = serde_json::to_vec(meta).expect("serialisable");
        let mut buf = Vec::with_capacity(56 + meta_json.len() + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(meta_json.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(&Sha256::digest(payload));
        buf.extend_from_slice(&meta_json);
        buf.extend_from_slice(payload);
        let tmp = self.dir.join(format!(".{key}.{}.{:?}.tmp", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, self.path(key))
    }

    pub fn list(&self) -> Vec<EntryInfo> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return vec![] };
        let mut v: Vec<EntryInfo> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let key = p.file_name()?.to_str()?.strip_suffix(".bin")?.to_string();
                let bytes = std::fs::read(&p).ok()?;
                Some(EntryInfo { key, bytes: bytes.len() as u64, meta: Self::parse(&bytes).ok().map(|x| x.0) })
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Removes every entry (and stray temporary files); returns how many entries went.
    pub fn clear(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut n = 0;
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            let name = p.file_name().and_then(|x| x.to_str()).unwrap_or("");
            if (name.ends_with(".bin") || name.ends_with(".tmp")) && std::fs::remove_file(&p).is_ok() && name.ends_with(".bin") {
                n += 1;
            }
        }
        n
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> EntryMeta {
        EntryMeta { file: "hip-kernels/x.hip".into(), arch: "sm_90a".into(), compiler: "nvrtc 13.0".into(), defines: vec![], created_unix: 0 }
    }

    fn tmp(tag: &str) -> KernelCache {
        let d = std::env::temp_dir().join(format!("engine-kc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        KernelCache::new(d)
    }

    #[test]
    fn key_depends_on_every_input() {
        let k = KernelCache::key("src", &["-O3".into()], "sm_90a", "13.0");
        assert_eq!(k.len(), 64);
        assert_ne!(k, KernelCache::key("src2", &["-O3".into()], "sm_90a", "13.0"));
        assert_ne!(k, KernelCache::key("src", &["-O2".into()], "sm_90a", "13.0"));
        assert_ne!(k, KernelCache::key("src", &["-O3".into()], "gfx942", "13.0"));
        assert_ne!(k, KernelCache::key("src", &["-O3".into()], "sm_90a", "13.1"));
        assert_eq!(k, KernelCache::key("src", &["-O3".into()], "sm_90a", "13.0"));
    }

    #[test]
    fn round_trip_corruption_and_truncation_are_rebuilt() {
        let c = tmp("rt");
        assert!(c.get("k1").is_none());
        c.put("k1", &meta(), b"binary payload").unwrap();
        assert_eq!(c.get("k1").unwrap(), b"binary payload");
        assert_eq!(c.list().len(), 1);
        assert_eq!(c.list()[0].meta.as_ref().unwrap().arch, "sm_90a");
        // flip a payload byte: checksum mismatch, entry removed
        let p = c.dir.join("k1.bin");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(c.get("k1").is_none());
        assert!(!p.exists());
        // truncated
        c.put("k2", &meta(), b"0123456789").unwrap();
        let p2 = c.dir.join("k2.bin");
        let b = std::fs::read(&p2).unwrap();
        std::fs::write(&p2, &b[..b.len() - 3]).unwrap();
        assert!(c.get("k2").is_none());
        // garbage
        std::fs::write(c.dir.join("k3.bin"), b"junk").unwrap();
        assert!(c.get("k3").is_none());
        c.put("k4", &meta(), b"x").unwrap();
        assert_eq!(c.clear(), 1);
        assert!(c.list().is_empty());
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    #[test]
    fn concurrent_writers_leave_a_valid_entry() {
        let c = std::sync::Arc::new(tmp("conc"));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let p = payload.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        c.put("shared", &meta(), &p).unwrap();
                        if let Some(got) = c.get("shared") {
                            assert_eq!(got, p);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(c.get("shared").unwrap(), payload);
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}
