//! A checkpoint directory: one or many safetensors files, found through
//! `model.safetensors.index.json` when present, else every `*.safetensors` file in the folder.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{DType, HostLinear, LinearData, MmapSlice, SafetensorsFile, TensorInfo, WeightError};

pub struct WeightStore {
    pub dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`
    location: HashMap<String, usize>,
    /// `--load-format dummy`: tensors made in memory instead of read from files
    dummy: Option<super::dummy::DummyWeights>,
}

/// `--load-format`: where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadFormat {
    /// The safetensors files of --model-path
    #[default]
    Auto,
    /// Random weights made in memory from config.json alone (what `engine gen-model` would write, seed 0)
    Dummy,
}

/// One tensor of the checkpoint, still in its file's bytes.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub info: &'a TensorInfo,
    pub bytes: MmapSlice,
}

impl TensorView<'_> {
    fn err(&self, msg: String) -> WeightError {
        WeightError::Tensor { file: self.file.to_path_buf(), tensor: self.name.to_string(), msg }
    }

    /// Checks dtype and shape, with an error naming the file and tensor.
    pub fn expect(&self, dtypes: &[DType], shape: &[usize]) -> Result<(), WeightError> {
        if !dtypes.contains(&self.info.dtype) {
            let names: Vec<_> = dtypes.iter().map(|d| d.safetensors_name()).collect();
            return Err(self.err(format!("dtype {} is not one of {}", self.info.dtype.safetensors_name(), names.join(", "))));
        }
        if self.info.shape != shape {
            return Err(self.err(format!("shape {:?}, expected {:?}", self.info.shape, shape)));
        }
        Ok(())
    }

    /// The tensor as f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Result<Vec<f32>, WeightError> {
        let b = &*self.bytes;
        Ok(match self.info.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| super::bf16_to_f32(c[0], c[1])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| super::f16_to_f32(c[0], c[1])).collect(),
            DType::F8E4M3 => return Err(self.err("is FP8, expected a floating-point tensor of 16 or 32 bits".into())),
        })
    }
}

const INDEX: &str = "model.safetensors.index.json";

impl WeightStore {
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let index_path = dir.join(INDEX);
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let ferr = |msg: String| WeightError::File { file: index_path.clone(), msg };
            let text = std::fs::read_to_string(&index_path).map_err(|e| ferr(format!("cannot read: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ferr(format!("not valid JSON: {e}")))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ferr("no `weight_map` object".into()))?;
            let mut file_idx: HashMap<String, usize> = HashMap::new();
            let mut names: Vec<&String> = map.keys().collect();
            names.sort();
            for name in names {
                let fname = map[name].as_str().ok_or_else(|| ferr(format!("weight_map[{name:?}] is not a file name")))?;
                if fname.contains('/') || fname.contains("..") {
                    return Err(ferr(format!("weight_map[{name:?}] names {fname:?}, which is outside the checkpoint folder")));
                }
                let idx = match file_idx.get(fname) {
                    Some(i) => *i,
                    None => {
                        let path = dir.join(fname);
                        if !path.exists() {
                            return Err(ferr(format!("names shard {fname} (for tensor `{name}`), which does not exist")));
                        }
                        files.push(SafetensorsFile::open(&path)?);
                        file_idx.insert(fname.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[idx].tensors.contains_key(name) {
                    return Err(WeightError::Tensor {
                        file: files[idx].path.clone(),
                        tensor: name.clone(),
                        msg: format!("listed in {INDEX} but absent from this shard"),
                    });
                }
                location.insert(name.clone(), idx);
            }
        } else {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| WeightError::File { file: dir.to_path_buf(), msg: format!("cannot read checkpoint folder: {e}") })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            paths.sort();
            if paths.is_empty() {
                return Err(WeightError::File { file: dir.to_path_buf(), msg: format!("no {INDEX} and no *.safetensors files") });
            }
            for p in paths {
                let f = SafetensorsFile::open(&p)?;
                for name in f.tensors.keys() {
                    location.insert(name.clone(), files.len());
                }
                files.push(f);
            }
        }
        Ok(WeightStore { dir: dir.to_path_buf(), files, location, dummy: None })
    }

    /// The store `format` asks for: the folder's files, or dummy weights for `cfg`.
    pub fn open_as(dir: &Path, format: LoadFormat, cfg: &crate::config::ModelConfig) -> Result<Self, WeightError> {
        match format {
            LoadFormat::Auto => Self::open(dir),
            LoadFormat::Dummy => {
                log::warn!("--load-format dummy: RANDOM weights made from {}/config.json; outputs are gibberish", dir.display());
                Ok(WeightStore { dir: dir.to_path_buf(), files: vec![], location: HashMap::new(), dummy: Some(super::dummy::DummyWeights::new(dir, cfg)) })
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name) || self.dummy.as_ref().is_some_and(|d| d.contains(name))
    }

    /// Bytes of every tensor (as stored, or as the dummy format makes them).
    pub fn total_bytes(&self) -> u64 {
        let files: u64 = self.location.iter().map(|(n, &i)| self.files[i].tensors[n].end as u64 - self.files[i].tensors[n].start as u64).sum();
        files + self.dummy.as_ref().map_or(0, |d| d.infos.values().map(|t| (t.end - t.start) as u64).sum())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str).chain(self.dummy.iter().flat_map(|d| d.names()))
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>, WeightError> {
        if let Some(d) = &self.dummy {
            if let (Some((key, info)), Some(bytes)) = (d.infos.get_key_value(name), d.bytes(name)) {
                return Ok(TensorView { name: key, file: &d.path, info, bytes });
            }
        }
        let Some((key, &idx)) = self.location.get_key_value(name) else {
            let looked: Vec<_> = self.files.iter().filter_map(|f| f.path.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
            return Err(WeightError::Missing { tensor: name.to_string(), dir: self.dir.clone(), looked: looked.join(", ") });
        };
        let f = &self.files[idx];
        let info = &f.tensors[name];
        Ok(TensorView { name: key, file: &f.path, info, bytes: f.bytes(info) })
    }

    /// A vector (norm weight, bias) of length `n`, as f32.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, WeightError> {
        let t = self.get(name)?;
        t.expect(&[DType::F32, DType::BF16, DType::F16], &[n])?;
        t.to_f32()
    }

    /// A linear layer's weight `{prefix}.weight` of shape [out, in]; FP8 weights bring their
    /// `{prefix}.weight_scale_inv` of shape [ceil(out/bn), ceil(in/bk)].
    pub fn linear(&self, prefix: &str, out: usize, inp: usize, block: Option<(usize, usize)>) -> Result<HostLinear, WeightError> {
        let name = format!("{prefix}.weight");
        let t = self.get(&name)?;
        let allowed: &[DType] = if block.is_some() { &[DType::F8E4M3, DType::BF16, DType::F16, DType::F32] } else { &[DType::BF16, DType::F16, DType::F32] };
        t.expect(allowed, &[out, inp])?;
        let data = match t.info.dtype {
            DType::F32 => LinearData::F32(t.bytes.clone()),
            DType::BF16 => LinearData::BF16(t.bytes.clone()),
            DType::F16 => LinearData::F16(t.bytes.clone()),
            DType::F8E4M3 => {
                let (bn, bk) = block.expect("checked above");
                let sname = format!("{prefix}.weight_scale_inv");
                let s = self.get(&sname)?;
                s.expect(&[DType::F32, DType::BF16], &[out.div_ceil(bn), inp.div_ceil(bk)])?;
                let scale_inv = s.to_f32()?;
                if let Some(i) = scale_inv.iter().position(|x| !x.is_finite()) {
                    return Err(WeightError::Tensor { file: s.file.to_path_buf(), tensor: sname, msg: format!("element {i} is not finite") });
                }
                LinearData::Fp8 { w: t.bytes.clone(), scale_inv, block_n: bn, block_k: bk }
            }
        };
        Ok(HostLinear { name, out, inp, data })
    }
}
