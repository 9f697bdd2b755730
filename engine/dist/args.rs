//! SGLang's parallelism flags and the rank layout they imply.
use std::time::Duration;

/// `--tp-size/--tp`, `--ep-size/--ep`, `--nnodes`, `--node-rank`, `--dist-init-addr`,
/// `--dist-timeout`, `--base-gpu-id`: shared by `serve`, `generate` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct DistArgs {
    /// Tensor-parallel size: the ranks (GPUs) the model is split across, over all nodes
    #[arg(long = "tp-size", visible_alias = "tp", default_value_t = 1)]
    pub tp_size: usize,
    /// Expert-parallel size: 1 splits every routed expert by its intermediate size; equal to
    /// --tp-size gives each rank whole experts (n_routed_experts / tp of them)
    #[arg(long = "ep-size", visible_alias = "ep", default_value_t = 1)]
    pub ep_size: usize,
    /// Data-parallel size of attention (with --enable-dp-attention; must equal --tp-size)
    #[arg(long = "dp-size", visible_alias = "dp", default_value_t = 1)]
    pub dp_size: usize,
    /// Attention data-parallel: each rank runs whole attention for its own requests over its own
    /// KV cache (not replicated), MoE/MLP stay tensor/expert parallel across all ranks
    #[arg(long)]
    pub enable_dp_attention: bool,
    /// Number of nodes (one engine process per node drives that node's GPUs)
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index; node 0 serves HTTP and hosts the rendezvous store
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// host:port of node 0's rendezvous store (required with --nnodes > 1)
    #[arg(long)]
    pub dist_init_addr: Option<String>,
    /// Seconds any distributed wait may take (rendezvous, weight loading, a collective step)
    #[arg(long, default_value_t = 1800)]
    pub dist_timeout: u64,
    /// First GPU ordinal this node uses
    #[arg(long, default_value_t = 0)]
    pub base_gpu_id: usize,
}

impl Default for DistArgs {
    fn default() -> Self {
        DistArgs { tp_size: 1, ep_size: 1, dp_size: 1, enable_dp_attention: false, nnodes: 1, node_rank: 0, dist_init_addr: None, dist_timeout: 1800, base_gpu_id: 0 }
    }
}

/// The validated layout.
#[derive(Debug, Clone)]
pub struct ParallelConfig {
    pub world: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub per_node: usize,
    pub expert_parallel: bool,
    /// Attention data-parallel over all `world` ranks
    pub dp_attention: bool,
    pub init_addr: Option<String>,
    pub timeout: Duration,
    pub base_device: usize,
}

impl DistArgs {
    pub fn validate(&self) -> Result<ParallelConfig, String> {
        let (tp, ep, nn) = (self.tp_size, self.ep_size, self.nnodes);
        if tp == 0 || nn == 0 {
            return Err("--tp-size and --nnodes must be at least 1".into());
        }
        if tp % nn != 0 {
            return Err(format!("--tp-size {tp} must be a multiple of --nnodes {nn} (every node drives tp/nnodes GPUs)"));
        }
        if self.node_rank >= nn {
            return Err(format!("--node-rank {} must be less than --nnodes {nn}", self.node_rank));
        }
        if ep != 1 && ep != tp {
            return Err(format!("--ep-size {ep} must be 1 or equal to --tp-size {tp} (experts are split over the tensor-parallel ranks)"));
        }
        if self.enable_dp_attention && (self.dp_size != tp || tp < 2) {
            return Err(format!("--enable-dp-attention needs --dp-size equal to --tp-size (at least 2); got --dp-size {} --tp-size {tp}", self.dp_size));
        }
        if !self.enable_dp_attention && self.dp_size != 1 {
            return Err(format!(
                "--dp-size {} without --enable-dp-attention would mean independent replicas, which this engine does not run in one process: start one server per replica",
                self.dp_size
            ));
        }
        if nn > 1 && self.dist_init_addr.is_none() {
            return Err("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's rendezvous address)".into());
        }
        if self.dist_timeout == 0 {
            return Err("--dist-timeout must be at least 1 second".into());
        }
        Ok(ParallelConfig {
            world: tp,
            nnodes: nn,
            node_rank: self.node_rank,
            per_node: tp / nn,
            expert_parallel: ep > 1,
            dp_attention: self.enable_dp_attention,
            init_addr: self.dist_init_addr.clone(),
            timeout: Duration::from_secs(self.dist_timeout),
            base_device: self.base_gpu_id,
        })
    }
}

impl ParallelConfig {
    pub fn is_single(&self) -> bool {
        self.world == 1
    }
    /// `--ep-size` as given (experts split by expert over all ranks, or not at all).
    pub fn ep_size(&self) -> usize {
        if self.expert_parallel { self.world } else { 1 }
    }
    /// `--dp-size` as given (attention data-parallel over all ranks, or not at all).
    pub fn dp_size(&self) -> usize {
        if self.dp_attention { self.world } else { 1 }
    }
    /// Global ranks this node drives, in order.
    pub fn local_ranks(&self) -> std::ops::Range<usize> {
        self.node_rank * self.per_node..(self.node_rank + 1) * self.per_node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_their_errors() {
        let a = DistArgs { tp_size: 8, nnodes: 2, node_rank: 1, dist_init_addr: Some("h:5000".into()), ..Default::default() };
        let p = a.validate().unwrap();
        assert_eq!((p.world, p.per_node, p.local_ranks()), (8, 4, 4..8));
        let bad = |a: DistArgs, want: &str| {
            let e = a.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(DistArgs { tp_size: 3, nnodes: 2, dist_init_addr: Some("h:1".into()), ..Default::default() }, "multiple of --nnodes");
        bad(DistArgs { tp_size: 2, nnodes: 2, ..Default::default() }, "--dist-init-addr");
        bad(DistArgs { tp_size: 4, ep_size: 2, ..Default::default() }, "--ep-size 2");
        bad(DistArgs { node_rank: 1, ..Default::default() }, "--node-rank 1");
        assert!(DistArgs { tp_size: 2, ep_size: 2, ..Default::default() }.validate().unwrap().expert_parallel);
        assert!(DistArgs { tp_size: 4, dp_size: 4, enable_dp_attention: true, ..Default::default() }.validate().unwrap().dp_attention);
        bad(DistArgs { tp_size: 4, dp_size: 2, enable_dp_attention: true, ..Default::default() }, "equal to --tp-size");
        bad(DistArgs { tp_size: 2, dp_size: 2, ..Default::default() }, "without --enable-dp-attention");
    }
}
