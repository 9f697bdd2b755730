//! One request through the engine, synchronously: `engine generate` and the golden tests use the
//! same scheduler and sampling code as the server, so its output is the server's output.
use std::sync::Arc;

use super::output::GenerateOutput;
use crate::backend::Backend;
use crate::model::{Model, ModelError};
use crate::sampling::SamplingParams;
use crate::scheduler::{spawn_engine, Event, RequestSpec, SchedulePolicy, SchedulerConfig};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub params: SamplingParams,
    pub return_logprob: bool,
    pub logprob_start_len: usize,
    pub top_logprobs_num: usize,
}

pub fn generate<B: Backend>(model: &Arc<Model<B>>, tok: Option<Arc<Tokenizer>>, req: &GenerateRequest) -> Result<GenerateOutput, ModelError> {
    let context = model.cfg.max_position_embeddings;
    let pool = (req.input_ids.len() + req.params.max_new_tokens).clamp(1, context.max(1));
    let cfg = SchedulerConfig { max_running_requests: 1, chunked_prefill_size: 8192, policy: SchedulePolicy::Fcfs };
    let engine = spawn_engine(model.clone(), tok, cfg, pool, false, String::new(), context)?;
    let spec = RequestSpec {
        input_ids: req.input_ids.clone(),
        params: req.params.clone(),
        return_logprob: req.return_logprob,
        logprob_start_len: req.return_logprob.then_some(req.logprob_start_len),
        top_logprobs_num: req.top_logprobs_num,
    };
    let (_, mut rx) = engine.submit(spec).map_err(|e| ModelError::Input(e.to_string()))?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Delta { .. } => {}
            Event::Done(out) => return Ok(out),
            Event::Error(e) => return Err(ModelError::Input(e)),
        }
    }
    Err(ModelError::Input("the engine stopped before the request finished".into()))
}
