//! Starting a model on one or many ranks. Process model: one engine process per node, one thread
//! per GPU (rank) in it. Threads share the memory-mapped checkpoint and the tokenizer, need no
//! IPC for the per-step batch (a channel), and a GPU failure ends the whole node at once, which
//! is the behaviour wanted from a tensor-parallel group anyway. Node 0's local rank 0 is the lead:
//! it runs the scheduler and serves HTTP; every other rank follows the jobs it sends.
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use super::{Model, ModelError, Shard};
use crate::backend::gpu::backend::{GpuBackend, GpuVendor};
use crate::backend::{Backend, BackendError};
use crate::config::ModelConfig;
use crate::dist::{Group, HostComm, JobFeed, LocalFollower, LocalGroup, ParallelConfig, RemoteNodes, StoreComm, TcpStore, Watchdog};
use crate::weights::{LoadFormat, WeightStore};

/// What one rank's backend is built from.
pub struct RankCtx {
    pub rank: usize,
    pub size: usize,
    /// The local device ordinal
    pub device: usize,
    /// The communicator id every rank shares (GPU backends)
    pub comm_id: Option<Vec<u8>>,
    /// A host collective group (the CPU backend)
    pub host_comm: Option<Arc<dyn HostComm>>,
    /// Graphs and numerics of a GPU backend
    pub opts: DeviceOpts,
}

/// What a GPU backend is told at start (the CPU backend has neither).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceOpts {
    /// Largest decode batch captured into a graph (0: none)
    pub graph_max_bs: usize,
    /// `--fp8-activations`: FP8 layers on the GEMM library quantise their input to FP8 (None:
    /// as the checkpoint's activation_scheme says, i.e. for every FP8 checkpoint)
    pub fp8_activations: Option<bool>,
}

impl DeviceOpts {
    /// `fp8_activations` with auto resolved for `cfg`.
    fn resolve(mut self, cfg: &ModelConfig) -> Self {
        self.fp8_activations = Some(self.fp8_activations.unwrap_or(cfg.quantization.is_some()));
        self
    }

    fn fp8_act(&self) -> bool {
        self.fp8_activations.unwrap_or(false)
    }
}

/// A backend that can be one rank of a tensor-parallel group.
pub trait RankBackend: Backend + Sized {
    /// True when the ranks talk through a device communicator (NCCL/RCCL) whose id rank 0 makes.
    const DEVICE_COMM: bool;
    fn new_comm_id() -> Result<Vec<u8>, String> {
        Ok(vec![])
    }
    fn for_rank(ctx: RankCtx) -> Result<Self, BackendError>;
    /// What the step watchdog polls for a failed peer (device communicators report it
    /// asynchronously); None where failures surface as errors or timeouts of the collective itself.
    fn comm_probe(&self) -> Option<crate::dist::CommProbe> {
        None
    }
}

impl RankBackend for crate::backend::cpu::CpuBackend {
    const DEVICE_COMM: bool = false;
    fn for_rank(ctx: RankCtx) -> Result<Self, BackendError> {
        if ctx.opts.fp8_activations == Some(true) {
            log::info!("cpu: FP8 activations (--fp8-activations; auto for FP8 checkpoints) are a GPU path: the CPU backend keeps f32 activations");
        }
        Ok(match ctx.host_comm {
            Some(c) if ctx.size > 1 => Self::with_comm(c),
            _ => Self::new(),
        })
    }
}

impl<V: GpuVendor> RankBackend for GpuBackend<V> {
    const DEVICE_COMM: bool = true;
    fn new_comm_id() -> Result<Vec<u8>, String> {
        crate::backend::gpu::ccl::unique_id(V::CCL)
    }
    fn for_rank(ctx: RankCtx) -> Result<Self, BackendError> {
        let mut b = Self::new(ctx.device)?;
        b.set_graph_max_bs(ctx.opts.graph_max_bs);
        b.set_fp8_activations(ctx.opts.fp8_act());
        match (ctx.size, ctx.comm_id) {
            (1, _) => Ok(b),
            (_, Some(id)) => b.with_ccl(&id, ctx.rank, ctx.size),
            (_, None) => Err(BackendError::Op { backend: V::NAME, op: "communicator init", msg: "no communicator id".into() }),
        }
    }
    fn comm_probe(&self) -> Option<crate::dist::CommProbe> {
        GpuBackend::comm_probe(self)
    }
}

/// What this process does after start-up.
#[allow(clippy::large_enum_variant)] // built once per process
pub enum Role<B: Backend> {
    /// Node 0: the lead rank's model, with its followers attached.
    Lead(Model<B>),
    /// A follower node: it ran node 0's jobs until node 0 stopped.
    FollowerDone,
}

fn par_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Parallel(e.to_string())
}

/// Loads the model for this node's ranks (the whole model when `par` is a single rank).
/// `opts`: a GPU backend's graphs and numerics (ignored by the CPU backend).
pub fn launch<B: RankBackend>(dir: &Path, par: &ParallelConfig, format: LoadFormat, opts: DeviceOpts) -> Result<Role<B>, ModelError> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let opts = opts.resolve(&cfg);
    let weights = Arc::new(WeightStore::open_as(dir, format, &cfg)?);
    let shard = |rank| Shard { rank, size: par.world, expert_parallel: par.expert_parallel, dp_attention: par.dp_attention };
    if par.is_single() {
        let b = B::for_rank(RankCtx { rank: 0, size: 1, device: par.base_device, comm_id: None, host_comm: None, opts })?;
        return Ok(Role::Lead(Model::from_store(b, cfg, &weights, shard(0))?));
    }
    let ranks = par.local_ranks();
    let lead_rank = ranks.start;
    let timeout = par.timeout;
    // start-up (rendezvous, communicator, weights) is one step under --dist-timeout: a rank that
    // never joins leaves the others blocked inside the communicator's init
    let watchdog = Watchdog::start(format!("rank {lead_rank} (node {})", par.node_rank), timeout);
    watchdog.enter_with_slack("start-up: rendezvous, communicator and weight loading".into(), std::time::Duration::from_secs(5));
    // rendezvous: node 0 hosts the store (multi-node only)
    let store = match (&par.init_addr, par.nnodes > 1) {
        (Some(addr), true) => Some(TcpStore::start(addr, lead_rank, timeout).map_err(par_err)?),
        _ => None,
    };
    let addr = match (&store, &par.init_addr) {
        (Some(s), _) if s.local_addr.is_some() => s.local_addr.unwrap().to_string(),
        (_, Some(a)) => a.clone(),
        _ => String::new(),
    };
    let comm_id = if B::DEVICE_COMM {
        Some(match (&store, par.node_rank) {
            (Some(s), 0) => {
                let id = B::new_comm_id().map_err(par_err)?;
                s.set("comm_id", &id).map_err(par_err)?;
                id
            }
            (Some(s), _) => s.get("comm_id").map_err(par_err)?,
            (None, _) => B::new_comm_id().map_err(par_err)?,
        })
    } else {
        None
    };
    let mut host_comms: Vec<Option<Arc<dyn HostComm>>> = if B::DEVICE_COMM {
        vec![None; par.per_node]
    } else if par.nnodes == 1 {
        LocalGroup::new(par.world, timeout).into_iter().map(|g| Some(Arc::new(g) as Arc<dyn HostComm>)).collect()
    } else {
        let mut v = Vec::new();
        for rank in ranks.clone() {
            let s = TcpStore::connect(&addr, rank, timeout).map_err(par_err)?;
            v.push(Some(Arc::new(StoreComm::new(Arc::new(s), rank, par.world)) as Arc<dyn HostComm>));
        }
        v
    };
    log::info!(
        "node {} of {}: ranks {ranks:?} of {} ({}experts split by {}), {}",
        par.node_rank,
        par.nnodes,
        par.world,
        if par.dp_attention { "DP attention, " } else { "" },
        if par.expert_parallel { "expert" } else { "intermediate size" },
        if B::DEVICE_COMM { "device collectives" } else { "host collectives" }
    );
    // every rank but the local lead loads in its own thread and then follows
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let mut locals = Vec::new();
    for (i, rank) in ranks.clone().enumerate().skip(1) {
        let (job_tx, job_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        locals.push(LocalFollower { rank, tx: job_tx, done: std::sync::Mutex::new(done_rx) });
        let ctx = RankCtx { rank, size: par.world, device: par.base_device + i, comm_id: comm_id.clone(), host_comm: host_comms[i].take(), opts };
        let (cfg, weights, ready) = (cfg.clone(), weights.clone(), ready_tx.clone());
        let sh = shard(rank);
        std::thread::Builder::new()
            .name(format!("rank{rank}"))
            .spawn(move || {
                let model = B::for_rank(ctx).map_err(ModelError::from).and_then(|b| Model::from_store(b, cfg, &weights, sh));
                drop(weights);
                match model {
                    Ok(m) => {
                        let _ = ready.send((rank, Ok(())));
                        follow(m, job_rx, done_tx);
                    }
                    Err(e) => {
                        let _ = ready.send((rank, Err(e.to_string())));
                    }
                }
            })
            .map_err(par_err)?;
    }
    drop(ready_tx);
    let ctx = RankCtx { rank: lead_rank, size: par.world, device: par.base_device, comm_id, host_comm: host_comms[0].take(), opts };
    let mut model = Model::from_store(B::for_rank(ctx)?, cfg, &weights, shard(lead_rank))?;
    for _ in 1..par.per_node {
        match ready_rx.recv_timeout(timeout) {
            Ok((_, Ok(()))) => {}
            Ok((rank, Err(e))) => return Err(ModelError::Parallel(format!("rank {rank}: {e}"))),
            Err(_) => return Err(ModelError::Parallel(format!("rank {lead_rank}: timed out after {}s waiting for this node's ranks to load (--dist-timeout)", timeout.as_secs()))),
        }
    }
    if let Some(s) = &store {
        s.barrier("weights-loaded", par.nnodes).map_err(par_err)?;
    }
    watchdog.leave();
    watchdog.set_probe(model.backend.comm_probe());
    let remote = match (store, par.node_rank) {
        (Some(s), 0) => Some(RemoteNodes::new(s, par.nnodes)),
        (Some(s), node) => {
            model.set_group(Group { rank: lead_rank, locals, remote: None, timeout, watchdog });
            follow_node(&model, JobFeed::new(s, node))?;
            return Ok(Role::FollowerDone);
        }
        (None, _) => None,
    };
    model.set_group(Group { rank: lead_rank, locals, remote, timeout, watchdog });
    Ok(Role::Lead(model))
}

/// A follower rank's thread: runs each job on its own KV cache until the lead goes away.
fn follow<B: Backend>(model: Model<B>, jobs: mpsc::Receiver<crate::dist::Job>, done: mpsc::Sender<Result<(), String>>) {
    let mut kv = None;
    while let Ok(job) = jobs.recv() {
        let r = model.run_job(&mut kv, &job).map_err(|e| e.to_string());
        if let Err(e) = &r {
            log::error!("{e}");
        }
        if done.send(r).is_err() {
            break;
        }
    }
    // the lead is gone and the process is ending: leave the device state (and its communicator)
    // to the process exit rather than racing it with destructors
    std::mem::forget(model);
}

/// A follower node's main loop: node 0's jobs, run on this node's ranks, until node 0 stops.
fn follow_node<B: Backend>(model: &Model<B>, mut feed: JobFeed) -> Result<(), ModelError> {
    log::info!("node {}: following node 0's jobs", feed.node);
    let mut kv = None;
    loop {
        let job = match feed.next_job() {
            Ok(crate::dist::Job::Stop) => {
                log::info!("node {}: node 0 has finished; exiting", feed.node);
                let _ = feed.ack(Ok(()));
                return Ok(());
            }
            Ok(j) => j,
            Err(e) => return Err(ModelError::Parallel(format!("node {}: {e}", feed.node))),
        };
        let r = model.run_job(&mut kv, &job).map_err(|e| e.to_string());
        feed.ack(r).map_err(|e| ModelError::Parallel(format!("node {}: {e}", feed.node)))?;
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceOpts;
    use crate::config::ModelConfig;
    use crate::synth::{preset_config, Preset};

    #[test]
    fn fp8_activations_auto_follows_the_checkpoint() {
        let cfg = |p| ModelConfig::from_json_str(&preset_config(p, None).to_string(), "preset").unwrap();
        let (fp8, bf16) = (cfg(Preset::TinyV3Fp8), cfg(Preset::TinyV3));
        let opts = |f| DeviceOpts { graph_max_bs: 8, fp8_activations: f };
        // auto: dynamic for a block-FP8 checkpoint (activation_scheme "dynamic"), f32 otherwise
        assert!(opts(None).resolve(&fp8).fp8_act());
        assert!(!opts(None).resolve(&bf16).fp8_act());
        // explicit choices stand
        assert!(!opts(Some(false)).resolve(&fp8).fp8_act());
        assert!(opts(Some(true)).resolve(&bf16).fp8_act());
        assert_eq!(opts(None).resolve(&fp8).graph_max_bs, 8);
    }
}
