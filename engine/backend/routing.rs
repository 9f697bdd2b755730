//! MoE routing rules (DEEPSEEK.md "MoE routing"), as pure functions on one token's router logits.
//! The CPU backend uses them directly; GPU routing kernels are tested against them.
use crate::config::{ScoringFunc, TopkMethod};

#[derive(Debug, Clone)]
pub struct RouteParams {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub method: TopkMethod,
    pub scoring: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Indices of the `k` largest values (ties to the lower index), best first.
fn top_k_indices(vals: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..vals.len()).collect();
    idx.sort_by(|&a, &b| vals[b].partial_cmp(&vals[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes one token: returns (expert ids, weights), `top_k` of each.
/// `bias` is V3's e_score_correction_bias (used for selection only).
pub fn route_token(logits: &[f32], bias: Option<&[f32]>, p: &RouteParams) -> (Vec<u32>, Vec<f32>) {
    let e = p.n_experts;
    let scores: Vec<f32> = match p.scoring {
        ScoringFunc::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        ScoringFunc::Softmax => {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
            let s: f32 = ex.iter().sum();
            ex.into_iter().map(|x| x / s).collect()
        }
    };
    let choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    let per_group = e / p.n_group;
    let masked: Vec<f32> = match p.method {
        TopkMethod::Greedy => choice,
        TopkMethod::NoauxTc | TopkMethod::GroupLimitedGreedy => {
            let group_scores: Vec<f32> = choice
                .chunks(per_group)
                .map(|g| {
                    if p.method == TopkMethod::NoauxTc {
                        let t = top_k_indices(g, 2);
                        t.iter().map(|&i| g[i]).sum()
                    } else {
                        g.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
                    }
                })
                .collect();
            let keep = top_k_indices(&group_scores, p.topk_group);
            let mut m = vec![f32::NEG_INFINITY; e];
            for g in keep {
                m[g * per_group..(g + 1) * per_group].copy_from_slice(&choice[g * per_group..(g + 1) * per_group]);
            }
            m
        }
    };
    let ids = top_k_indices(&masked, p.top_k);
    let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
    match p.method {
        // V3: normalise (optionally), then scale.
        TopkMethod::NoauxTc => {
            if p.norm_topk_prob {
                let s: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= s);
            }
            w.iter_mut().for_each(|x| *x *= p.routed_scaling_factor);
        }
        // V2 (DeepSeek's reference code): normalise when asked and top_k > 1, otherwise scale.
        _ => {
            if p.top_k > 1 && p.norm_topk_prob {
                let s: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= s);
            } else {
                w.iter_mut().for_each(|x| *x *= p.routed_scaling_factor);
            }
        }
    }
    (ids.into_iter().map(|i| i as u32).collect(), w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: TopkMethod, scoring: ScoringFunc) -> RouteParams {
        RouteParams { n_experts: 8, top_k: 2, n_group: 4, topk_group: 2, method, scoring, norm_topk_prob: true, routed_scaling_factor: 2.5 }
    }

    #[test]
    fn noaux_tc_uses_bias_for_selection_only() {
        let logits = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7];
        // A huge bias on experts 0 and 1 puts group 0 and those experts first.
        let bias = [5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let (ids, w) = route_token(&logits, Some(&bias), &params(TopkMethod::NoauxTc, ScoringFunc::Sigmoid));
        assert_eq!(ids, vec![0, 1]);
        let s0 = 0.5f32;
        let s1 = 1.0 / (1.0 + (-0.1f32).exp());
        assert!((w[0] - 2.5 * s0 / (s0 + s1)).abs() < 1e-6 && (w[1] - 2.5 * s1 / (s0 + s1)).abs() < 1e-6);
    }

    #[test]
    fn group_limited_greedy_keeps_best_groups() {
        // groups: {0,1} {2,3} {4,5} {6,7}; best maxima are groups 3 and 0.
        let logits = [3.0, -5.0, 1.0, 1.0, 1.0, 1.0, 4.0, -5.0];
        let mut p = params(TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax);
        p.norm_topk_prob = false;
        let (ids, w) = route_token(&logits, None, &p);
        assert_eq!(ids, vec![6, 0]);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((w[0] - 2.5 * 4f32.exp() / z).abs() < 1e-6);
        let (ids, _) = route_token(&logits, None, &RouteParams { method: TopkMethod::Greedy, ..p });
        assert_eq!(ids, vec![6, 0]);
    }
}
