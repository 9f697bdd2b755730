//! The safetensors format: an 8-byte little-endian header length, a JSON header naming each tensor's
//! dtype, shape and byte range, then the data. Files are memory-mapped; every header field is checked
//! against the file so that a truncated or corrupt file is an error naming the file and tensor.
use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::{DType, WeightError};

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the file (already offset past the header).
    pub start: usize,
    pub end: usize,
}

/// A byte range of a memory-mapped file, kept alive by an `Arc`.
#[derive(Clone)]
pub struct MmapSlice {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl MmapSlice {
    /// A slice over bytes owned in memory (used by tests and by converted weights).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1)).expect("anonymous map");
        m[..bytes.len()].copy_from_slice(&bytes);
        let len = bytes.len();
        MmapSlice { map: Arc::new(m.make_read_only().expect("read-only map")), start: 0, end: len }
    }
}

impl MmapSlice {
    /// Bytes `range` of this slice, sharing the same mapping (no copy).
    pub fn sub(&self, range: std::ops::Range<usize>) -> MmapSlice {
        assert!(range.start <= range.end && self.start + range.end <= self.end, "MmapSlice::sub out of range");
        MmapSlice { map: self.map.clone(), start: self.start + range.start, end: self.start + range.end }
    }
}

impl Deref for MmapSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl std::fmt::Debug for MmapSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmapSlice({} bytes)", self.end - self.start)
    }
}

pub struct SafetensorsFile {
    pub path: PathBuf,
    map: Arc<Mmap>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        let ferr = |msg: String| WeightError::File { file: path.to_path_buf(), msg };
        let file = std::fs::File::open(path).map_err(|e| ferr(format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| ferr(format!("cannot stat: {e}")))?.len();
        if len < 8 {
            return Err(ferr(format!("truncated: {len} bytes, shorter than the 8-byte header length")));
        }
        // SAFETY: the file is opened read-only; checkpoints are not modified while being served.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ferr(format!("cannot mmap: {e}")))?;
        let n = u64::from_le_bytes(map[..8].try_into().unwrap());
        if n > MAX_HEADER || 8 + n > len {
            return Err(ferr(format!("corrupt or truncated header: header length {n} but file has {len} bytes")));
        }
        let header: Value = serde_json::from_slice(&map[8..8 + n as usize])
            .map_err(|e| ferr(format!("corrupt header (not valid JSON): {e}")))?;
        let obj = header.as_object().ok_or_else(|| ferr("corrupt header: not a JSON object".into()))?;
        let data_start = 8 + n as usize;
        let data_len = len as usize - data_start;
        let mut tensors = BTreeMap::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let terr = |msg: String| WeightError::Tensor { file: path.to_path_buf(), tensor: name.clone(), msg };
            let dtype_name = v.get("dtype").and_then(Value::as_str).ok_or_else(|| terr("header entry has no dtype".into()))?;
            let dtype = DType::from_safetensors(dtype_name)
                .ok_or_else(|| terr(format!("unsupported dtype {dtype_name} (supported: F32, F16, BF16, F8_E4M3)")))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| terr("header entry has no valid shape".into()))?;
            let offs = v
                .get("data_offsets")
                .and_then(Value::as_array)
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
                .ok_or_else(|| terr("header entry has no valid data_offsets".into()))?;
            if offs.0 > offs.1 || offs.1 > data_len {
                return Err(terr(format!(
                    "data_offsets {:?} outside the data section of {data_len} bytes (file truncated?)",
                    offs
                )));
            }
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| terr("shape overflows".into()))?;
            if numel * dtype.size() != offs.1 - offs.0 {
                return Err(terr(format!(
                    "shape {shape:?} of {dtype_name} needs {} bytes but data_offsets cover {}",
                    numel * dtype.size(),
                    offs.1 - offs.0
                )));
            }
            tensors.insert(name.clone(), TensorInfo { dtype, shape, start: data_start + offs.0, end: data_start + offs.1 });
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), map: Arc::new(map), tensors })
    }

    pub fn bytes(&self, info: &TensorInfo) -> MmapSlice {
        MmapSlice { map: self.map.clone(), start: info.start, end: info.end }
    }
}

/// Writes a safetensors file from (name, dtype, shape, bytes) entries, in the given order.
pub fn write_safetensors(path: &Path, entries: &[(String, DType, Vec<usize>, Vec<u8>)]) -> std::io::Result<()> {
    let specs: Vec<_> = entries.iter().map(|(n, d, s, _)| (n.clone(), *d, s.clone())).collect();
    write_safetensors_with(path, &specs, |i| entries[i].3.clone())
}

/// Writes a safetensors file whose tensors are produced one at a time by `data(i)` (so a file far
/// larger than memory can be written). Goes through a temporary file and a rename.
pub fn write_safetensors_with(path: &Path, specs: &[(String, DType, Vec<usize>)], mut data: impl FnMut(usize) -> Vec<u8>) -> std::io::Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, dtype, shape) in specs {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(name.clone(), serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [off, off + len]}));
        off += len;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for (i, (name, dtype, shape)) in specs.iter().enumerate() {
            let bytes = data(i);
            let want = shape.iter().product::<usize>() * dtype.size();
            if bytes.len() != want {
                return Err(std::io::Error::other(format!("tensor {name}: produced {} bytes, expected {want}", bytes.len())));
            }
            f.write_all(&bytes)?;
        }
        f.flush()?;
    }
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("engine-st-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_errors() {
        let d = tmpdir("rt");
        let p = d.join("a.safetensors");
        let data: Vec<u8> = (0..24).collect();
        write_safetensors(&p, &[("w".into(), DType::F32, vec![2, 3], data.clone())]).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        let info = &f.tensors["w"];
        assert_eq!(info.shape, vec![2, 3]);
        assert_eq!(&*f.bytes(info), &data[..]);

        // truncated: cut the data section
        let bytes = std::fs::read(&p).unwrap();
        let t = d.join("trunc.safetensors");
        std::fs::write(&t, &bytes[..bytes.len() - 5]).unwrap();
        let e = SafetensorsFile::open(&t).err().unwrap().to_string();
        assert!(e.contains("trunc.safetensors") && e.contains("`w`") && e.contains("truncated"), "{e}");

        // corrupt header
        let mut c = bytes.clone();
        c[8..20].fill(b'#');
        let cp = d.join("corrupt.safetensors");
        std::fs::write(&cp, &c).unwrap();
        let e = SafetensorsFile::open(&cp).err().unwrap().to_string();
        assert!(e.contains("corrupt.safetensors") && e.contains("corrupt header"), "{e}");

        // absurd header length
        let mut c = bytes.clone();
        c[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&cp, &c).unwrap();
        assert!(SafetensorsFile::open(&cp).err().unwrap().to_string().contains("header length"));

        // tiny file
        std::fs::write(&cp, b"abc").unwrap();
        assert!(SafetensorsFile::open(&cp).err().unwrap().to_string().contains("truncated"));
        std::fs::remove_dir_all(d).ok();
    }
}
