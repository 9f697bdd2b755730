//! Configuration: the model's Hugging Face `config.json` (`ModelConfig`) and, later, the server's flags.
mod json_fields;
mod model_config;
mod rope;

pub use json_fields::Fields;
pub use model_config::{Fp8Config, ModelConfig, ModelType, ScoringFunc, TopkMethod};
pub use rope::{RopeConfig, RopeTables};

/// An error in a configuration document, naming the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: field `{field}`: {msg}")]
    Invalid { origin: String, field: String, msg: String },
    #[error("{origin}: {source}")]
    Io { origin: String, source: std::io::Error },
    #[error("{origin}: not valid JSON: {source}")]
    Json { origin: String, source: serde_json::Error },
}

impl ConfigError {
    pub fn invalid(origin: &str, field: &str, msg: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: origin.to_string(), field: field.to_string(), msg: msg.into() }
    }
}
