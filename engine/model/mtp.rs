//! The multi-token-prediction (MTP) module stored at `model.layers.{num_hidden_layers}` (and beyond,
//! one per nextn layer). The plain forward pass never reads it; it is recognised so that loading,
//! `engine info` and weight accounting treat it as what it is.

/// The layer index of a tensor name `model.layers.{i}.…`, if it is one.
pub fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Whether `name` belongs to an MTP module of a model with `num_hidden_layers` decoder layers.
pub fn is_mtp_tensor(name: &str, num_hidden_layers: usize) -> bool {
    layer_index(name).is_some_and(|i| i >= num_hidden_layers)
}

#[cfg(test)]
mod tests {
    #[test]
    fn recognises_mtp_names() {
        assert!(super::is_mtp_tensor("model.layers.61.eh_proj.weight", 61));
        assert!(super::is_mtp_tensor("model.layers.61.shared_head.head.weight", 61));
        assert!(!super::is_mtp_tensor("model.layers.60.mlp.gate.weight", 61));
        assert!(!super::is_mtp_tensor("model.norm.weight", 61));
    }
}
