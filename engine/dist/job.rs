//! What a lead rank sends its followers each step: allocate the KV cache, or run this batch.
//! Local followers get it over a channel; follower nodes get it as bytes through the store.
use crate::backend::AttnSeq;
use crate::model::ForwardBatch;

#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    AllocKv(usize),
    Forward(OwnedBatch),
    /// DP attention: one batch per rank, in rank order
    ForwardDp(Vec<OwnedBatch>),
    /// `iters` all-reduces of `elems` floats (the bench measures the collective this way)
    CommBench { elems: usize, iters: usize },
    /// The lead is done: follower nodes exit cleanly
    Stop,
}

/// A `ForwardBatch` that owns its data.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// (q_start, q_len, slots) per sequence
    pub seqs: Vec<(u32, u32, Vec<u32>)>,
    pub logit_rows: Vec<u32>,
}

impl OwnedBatch {
    pub fn of(b: &ForwardBatch) -> Self {
        OwnedBatch {
            tokens: b.tokens.to_vec(),
            positions: b.positions.to_vec(),
            seqs: b.seqs.iter().map(|s| (s.q_start as u32, s.q_len as u32, s.slots.to_vec())).collect(),
            logit_rows: b.logit_rows.to_vec(),
        }
    }

    pub fn seqs_view(&self) -> Vec<AttnSeq<'_>> {
        self.seqs.iter().map(|(s, l, slots)| AttnSeq { q_start: *s as usize, q_len: *l as usize, slots }).collect()
    }

    pub fn view<'a>(&'a self, seqs: &'a [AttnSeq<'a>]) -> ForwardBatch<'a> {
        ForwardBatch { tokens: &self.tokens, positions: &self.positions, seqs, logit_rows: &self.logit_rows }
    }

    pub fn with_view<R>(&self, f: impl FnOnce(&ForwardBatch) -> R) -> R {
        let seqs = self.seqs_view();
        f(&self.view(&seqs))
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put(out, &self.tokens);
        put(out, &self.positions);
        put(out, &self.logit_rows);
        out.extend((self.seqs.len() as u32).to_le_bytes());
        for (s, l, slots) in &self.seqs {
            out.extend(s.to_le_bytes());
            out.extend(l.to_le_bytes());
            put(out, slots);
        }
    }

    fn decode_from(r: &mut Reader) -> Result<OwnedBatch, String> {
        let (tokens, positions, logit_rows) = (r.vec()?, r.vec()?, r.vec()?);
        let n = r.u32()?;
        let mut seqs = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            seqs.push((r.u32()?, r.u32()?, r.vec()?));
        }
        Ok(OwnedBatch { tokens, positions, seqs, logit_rows })
    }
}

fn put(out: &mut Vec<u8>, v: &[u32]) {
    out.extend((v.len() as u32).to_le_bytes());
    for x in v {
        out.extend(x.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("job message truncated".into());
        }
        let (a, b) = self.0.split_at(4);
        self.0 = b;
        Ok(u32::from_le_bytes(a.try_into().unwrap()))
    }
    fn vec(&mut self) -> Result<Vec<u32>, String> {
        let n = self.u32()? as usize;
        if n * 4 > self.0.len() {
            return Err(format!("job message truncated: vector of {n} u32 but {} bytes left", self.0.len()));
        }
        (0..n).map(|_| self.u32()).collect()
    }
}

impl Job {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Job::AllocKv(n) => {
                out.push(0);
                out.extend((*n as u64).to_le_bytes());
            }
            Job::Stop => out.push(4),
            Job::CommBench { elems, iters } => {
                out.push(2);
                out.extend((*elems as u64).to_le_bytes());
                out.extend((*iters as u64).to_le_bytes());
            }
            Job::Forward(b) => {
                out.push(1);
                b.encode_into(&mut out);
            }
            Job::ForwardDp(bs) => {
                out.push(3);
                out.extend((bs.len() as u32).to_le_bytes());
                for b in bs {
                    b.encode_into(&mut out);
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Job, String> {
        match bytes.split_first() {
            Some((0, rest)) if rest.len() == 8 => Ok(Job::AllocKv(u64::from_le_bytes(rest.try_into().unwrap()) as usize)),
            Some((tag @ (1 | 3), rest)) => {
                let mut r = Reader(rest);
                let job = if *tag == 1 {
                    Job::Forward(OwnedBatch::decode_from(&mut r)?)
                } else {
                    let n = r.u32()?;
                    Job::ForwardDp((0..n).map(|_| OwnedBatch::decode_from(&mut r)).collect::<Result<_, _>>()?)
                };
                if !r.0.is_empty() {
                    return Err(format!("job message has {} trailing bytes", r.0.len()));
                }
                Ok(job)
            }
            Some((2, rest)) if rest.len() == 16 => Ok(Job::CommBench {
                elems: u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize,
                iters: u64::from_le_bytes(rest[8..].try_into().unwrap()) as usize,
            }),
            Some((4, [])) => Ok(Job::Stop),
            _ => Err("unknown job message".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_and_garbage_is_rejected() {
        let b = OwnedBatch { tokens: vec![5, 6, 7], positions: vec![0, 1, 9], seqs: vec![(0, 2, vec![3, 4]), (2, 1, vec![8; 10])], logit_rows: vec![1, 2] };
        let empty = OwnedBatch { tokens: vec![], positions: vec![], seqs: vec![], logit_rows: vec![] };
        for j in [Job::AllocKv(123456789), Job::Forward(b.clone()), Job::CommBench { elems: 7168, iters: 50 }, Job::ForwardDp(vec![b, empty]), Job::Stop] {
            let e = j.encode();
            assert_eq!(Job::decode(&e).unwrap(), j);
            assert!(Job::decode(&e[..e.len() - 1]).is_err());
        }
        assert!(Job::decode(&[9]).is_err());
    }
}
