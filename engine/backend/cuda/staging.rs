//! Weight upload through pinned staging. Checkpoint bytes (memory-mapped) are copied into one of
//! two page-locked buffers and DMA'd to the device asynchronously, so reading the next chunk from
//! the page cache overlaps the transfer of the previous one, and no pageable copy (which the driver
//! would stage and synchronise on itself) is made. Each buffer is reused only after an event says
//! its last transfer has finished.
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice};

use super::{err, CudaBackend};
use crate::backend::BackendError;

/// Bytes per staging buffer.
const CHUNK: usize = 32 << 20;

pub struct Staging {
    bufs: [PinnedHostSlice<u8>; 2],
    /// The last transfer out of each buffer
    done: [Option<CudaEvent>; 2],
}

impl CudaBackend {
    /// A device buffer holding `parts` back to back.
    pub(crate) fn upload_parts(&self, parts: &[&[u8]]) -> Result<CudaSlice<u8>, BackendError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // SAFETY: every byte is written below before any kernel reads it
        let mut dst = unsafe { self.stream.alloc::<u8>(total.max(1)) }.map_err(err("upload"))?;
        let mut guard = self.staging.lock().unwrap();
        if guard.is_none() {
            // SAFETY: staging memory is written before it is read
            let a = unsafe { self.ctx.alloc_pinned::<u8>(CHUNK) }.map_err(err("alloc_pinned"))?;
            let b = unsafe { self.ctx.alloc_pinned::<u8>(CHUNK) }.map_err(err("alloc_pinned"))?;
            *guard = Some(Staging { bufs: [a, b], done: [None, None] });
        }
        let st = guard.as_mut().unwrap();
        let (base, _sync) = dst.device_ptr_mut(&self.stream);
        let (mut cur, mut fill, mut off) = (0usize, 0usize, 0usize);
        let flush = |st: &mut Staging, cur: usize, fill: usize, off: usize| -> Result<(), BackendError> {
            let src = st.bufs[cur].as_mut_slice().map_err(err("staging"))?;
            // SAFETY: `src` is page-locked and is not touched again until `done[cur]` completes
            unsafe { cudarc::driver::result::memcpy_htod_async(base + off as u64, &src[..fill], self.stream.cu_stream()) }.map_err(err("upload"))?;
            st.done[cur] = Some(self.stream.record_event(None).map_err(err("upload"))?);
            Ok(())
        };
        for part in parts {
            let mut p: &[u8] = part;
            while !p.is_empty() {
                if fill == 0 {
                    if let Some(e) = st.done[cur].take() {
                        e.synchronize().map_err(err("staging"))?;
                    }
                }
                let n = (CHUNK - fill).min(p.len());
                st.bufs[cur].as_mut_slice().map_err(err("staging"))?[fill..fill + n].copy_from_slice(&p[..n]);
                fill += n;
                p = &p[n..];
                if fill == CHUNK {
                    flush(st, cur, fill, off)?;
                    off += fill;
                    fill = 0;
                    cur ^= 1;
                }
            }
        }
        if fill > 0 {
            flush(st, cur, fill, off)?;
        }
        drop(_sync);
        Ok(dst)
    }
}
