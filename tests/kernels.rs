//! Kernel compile checks and the kernel cache, without a GPU: NVRTC (PyPI `nvidia-cuda-nvrtc`,
//! loaded at run time; .ci/run installs it and sets ENGINE_NVRTC_LIB) compiles every kernel for
//! sm_90a through `engine kernels warmup --arch`, a warm cache compiles nothing, a corrupt entry
//! is rebuilt, and concurrent engines share one cache safely.
mod common;

use common::*;

fn nvrtc_env() -> String {
    std::env::var("ENGINE_NVRTC_LIB").unwrap_or_else(|_| {
        panic!("ENGINE_NVRTC_LIB is not set: install PyPI nvidia-cuda-nvrtc (cu13) and point it at nvidia/cu13/lib/libnvrtc.so.13 (.ci/run does this)")
    })
}

fn warmup(cache: &std::path::Path, model: &std::path::Path) -> (bool, String) {
    let o = engine()
        .env("ENGINE_NVRTC_LIB", nvrtc_env())
        .env("ENGINE_KERNEL_CACHE_DIR", cache)
        .env("ENGINE_LOG", "info")
        .args(["kernels", "warmup", "--arch", "sm_90a", "--model-path", model.to_str().unwrap()])
        .output()
        .unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn v3_official_dir(t: &TempDir) -> std::path::PathBuf {
    // DeepSeek-V3's real shapes: the MLA kernels are specialised for kv_lora 512, rope 64, nope 128, v 128
    let o = run(&["gen-model", "--preset", "tiny-v3", "--out", t.path().join("v3").to_str().unwrap()]);
    assert!(o.status.success());
    let p = t.path().join("v3/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (k, v) in [("kv_lora_rank", 512), ("qk_rope_head_dim", 64), ("qk_nope_head_dim", 128), ("v_head_dim", 128), ("num_attention_heads", 128)] {
        c[k] = v.into();
    }
    std::fs::write(&p, c.to_string()).unwrap();
    t.path().join("v3")
}

#[test]
fn every_kernel_compiles_for_sm90a_and_the_cache_is_reused() {
    let t = TempDir::new("kc");
    let cache = t.path().join("cache");
    let v3 = v3_official_dir(&t);
    for model in [golden_dir("tiny_v3"), golden_dir("tiny_v2_lite"), golden_dir("tiny_v3_fp8"), v3.clone()] {
        let (ok, log) = warmup(&cache, &model);
        assert!(ok, "{log}");
    }
    let entries = std::fs::read_dir(&cache).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "bin")).count();
    // the shape-independent modules + eight MLA modules (decode on the CUDA cores, prefill, bf16
    // prefill, its FlashAttention-2 and -3 forms, decode on the matrix units in 64- and 16-head
    // blocks and on the warpgroup MMA) per distinct (kv_lora, rope, nope, v)
    const MLA: usize = 8;
    let generic = engine::backend::gpu::modules_for(engine::backend::gpu::ModelDims { kv_lora_rank: 1, qk_rope_head_dim: 2, qk_nope_head_dim: 1, v_head_dim: 1 }, engine::backend::gpu::source::Vendor::Nvidia).len() - MLA;
    assert_eq!(entries, generic + MLA * 3, "cache entries");
    // a second start compiles nothing
    let (ok, log) = warmup(&cache, &v3);
    assert!(ok && log.contains(&format!("0 compiled, {} already cached", generic + MLA)), "{log}");
    // a corrupt entry is detected, logged and rebuilt
    // (a shape-independent module, so the next warmup of any model needs it)
    let victim = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin") && String::from_utf8_lossy(&std::fs::read(p).unwrap()).contains("hip-kernels/norm.hip"))
        .unwrap();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let (ok1, log1) = warmup(&cache, &v3);
    let (ok2, log2) = warmup(&cache, &golden_dir("tiny_v3"));
    assert!(ok1 && ok2);
    let both = format!("{log1}{log2}");
    assert!(both.contains("is corrupt") && both.contains("1 compiled"), "{both}");
    // `kernels list` and `kernels clear`
    let list = engine().env("ENGINE_KERNEL_CACHE_DIR", &cache).args(["kernels", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&format!("{} entries", generic + MLA * 3)));
    let clear = engine().env("ENGINE_KERNEL_CACHE_DIR", &cache).args(["kernels", "clear"]).output().unwrap();
    assert!(String::from_utf8_lossy(&clear.stdout).contains(&format!("removed {} entries", generic + MLA * 3)));
}

#[test]
fn concurrent_engines_share_one_cache() {
    let t = TempDir::new("kcc");
    let cache = t.path().join("cache");
    let v3 = v3_official_dir(&t);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (c, m) = (cache.clone(), v3.clone());
            std::thread::spawn(move || warmup(&c, &m))
        })
        .collect();
    for h in handles {
        let (ok, log) = h.join().unwrap();
        assert!(ok, "{log}");
    }
    let (ok, log) = warmup(&cache, &v3);
    assert!(ok && log.contains("0 compiled"), "every entry valid after concurrent writes: {log}");
}

#[test]
fn unknown_and_amd_archs_are_clear_errors() {
    let o = engine().args(["kernels", "warmup", "--arch", "banana", "--model-path", golden_dir("tiny_v3").to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown architecture"));
}
