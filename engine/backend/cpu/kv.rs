//! The CPU latent KV cache: per layer, `slots` entries of c_kv ‖ k_pe in f32.
#[derive(Debug)]
pub struct CpuKvCache {
    pub layers: usize,
    pub slots: usize,
    pub entry: usize,
    data: Vec<f32>,
}

impl CpuKvCache {
    pub fn new(layers: usize, slots: usize, entry: usize) -> Self {
        CpuKvCache { layers, slots, entry, data: vec![0.0; layers * slots * entry] }
    }
    pub fn entry(&self, layer: usize, slot: u32) -> &[f32] {
        let o = (layer * self.slots + slot as usize) * self.entry;
        &self.data[o..o + self.entry]
    }
    pub fn entry_mut(&mut self, layer: usize, slot: u32) -> &mut [f32] {
        let o = (layer * self.slots + slot as usize) * self.entry;
        &mut self.data[o..o + self.entry]
    }
}
