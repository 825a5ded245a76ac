//! Sends every part to a human, noting the model's top label: the rule a line
//! runs while a new model is being commissioned.

use lineside_plugin_sdk::Config;
use lineside_plugin_sdk::post::{Decision, Metadata, ModelOutput, Postprocessor, Verdict};

struct ReviewAll {
    reason: String,
}

impl Postprocessor for ReviewAll {
    fn init(c: Config) -> Result<Self, String> {
        Ok(ReviewAll { reason: c.get("reason").unwrap_or("commissioning").to_string() })
    }

    fn process(&self, output: ModelOutput, _: &Metadata) -> Result<Decision, String> {
        let top = match output {
            ModelOutput::Classification(s) => s.into_iter().max_by(|a, b| a.score.total_cmp(&b.score)).map(|s| s.label),
            _ => None,
        };
        let mut extra = vec![("rule".into(), "review-all/0.1".into()), ("reason".into(), self.reason.clone())];
        extra.extend(top.map(|t| ("model_label".to_string(), t)));
        Ok(Decision { verdict: Verdict::Review, defects: vec![], extra })
    }
}

lineside_plugin_sdk::postprocessor!(ReviewAll);
