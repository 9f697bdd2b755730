//! Weight upload through pinned staging. Checkpoint bytes (memory-mapped) are copied into one of
//! two page-locked buffers and DMA'd to the device asynchronously, so reading the next chunk from
//! the page cache overlaps the transfer of the previous one, and no pageable copy (which the driver
//! would stage and synchronise on itself) is made. Each buffer is reused only after an event says
//! its last transfer has finished.
use super::backend::{GpuBackend, GpuVendor};
use super::device::{err, DevBuf, DevEvent, PinnedBuf};
use crate::backend::BackendError;

/// Bytes per staging buffer.
const CHUNK: usize = 32 << 20;

pub struct Staging {
    bufs: [PinnedBuf; 2],
    /// The last transfer out of each buffer
    done: [Option<DevEvent>; 2],
}

impl<V: GpuVendor> GpuBackend<V> {
    /// A device buffer holding `parts` back to back.
    pub(crate) fn upload_parts(&self, parts: &[&[u8]]) -> Result<DevBuf<u8>, BackendError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // every byte is written below before any kernel reads it
        let dst = DevBuf::<u8>::alloc(&self.dev, total).map_err(err("upload"))?;
        let mut guard = self.staging.lock().unwrap();
        if guard.is_none() {
            let a = PinnedBuf::alloc(&self.dev, CHUNK).map_err(err("alloc_pinned"))?;
            let b = PinnedBuf::alloc(&self.dev, CHUNK).map_err(err("alloc_pinned"))?;
            *guard = Some(Staging { bufs: [a, b], done: [None, None] });
        }
        let st = guard.as_mut().unwrap();
        let base = dst.ptr();
        let (mut cur, mut fill, mut off) = (0usize, 0usize, 0usize);
        let flush = |st: &mut Staging, cur: usize, fill: usize, off: usize| -> Result<(), BackendError> {
            // page-locked, and not touched again until `done[cur]` completes
            let src = st.bufs[cur].as_mut_slice();
            self.dev.htod(base + off as u64, &src[..fill]).map_err(err("upload"))?;
            st.done[cur] = Some(DevEvent::record(&self.dev, false).map_err(err("upload"))?);
            Ok(())
        };
        for part in parts {
            let mut p: &[u8] = part;
            while !p.is_empty() {
                if fill == 0 {
                    if let Some(e) = st.done[cur].take() {
                        e.wait().map_err(err("staging"))?;
                    }
                }
                let n = (CHUNK - fill).min(p.len());
                st.bufs[cur].as_mut_slice()[fill..fill + n].copy_from_slice(&p[..n]);
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
        Ok(dst)
    }
}
