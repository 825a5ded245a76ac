//! Maps model labels to the factory's defect codes and decides the verdict.
//!
//! Config:
//! - `codes.<label> = "<code>"`: the factory code of each defect label.
//!   Labels without a code are reported as `unmapped_code` (default `UNMAPPED`).
//! - `thresholds.<label>`: the score at which a label counts (default `threshold`, 0.5).
//! - `severity.<label>`: 0..=1 (default 1).
//! - `pass_labels`: comma-separated labels that mean a good part (default `good`).
//!
//! Rule: every non-pass label at or above its threshold is a defect and the
//! verdict is `fail`; with none, a confident pass label passes, and anything
//! else goes to `review`.

use std::collections::HashMap;

use lineside_plugin_sdk::Config;
use lineside_plugin_sdk::post::{Decision, Defect, Metadata, ModelOutput, Postprocessor, Verdict};

struct DefectCodes {
    codes: HashMap<String, String>,
    thresholds: HashMap<String, f32>,
    severity: HashMap<String, f32>,
    threshold: f32,
    unmapped: String,
    pass_labels: Vec<String>,
}

fn floats(c: &Config, section: &str) -> Result<HashMap<String, f32>, String> {
    c.section(section)
        .map(|(k, v)| v.trim().parse().map(|f| (k.to_string(), f)).map_err(|e| format!("`{section}.{k}`: {e}")))
        .collect()
}

impl Postprocessor for DefectCodes {
    fn init(c: Config) -> Result<Self, String> {
        Ok(DefectCodes {
            codes: c.section("codes").map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            thresholds: floats(&c, "thresholds")?,
            severity: floats(&c, "severity")?,
            threshold: c.parse_or("threshold", 0.5)?,
            unmapped: c.parse_or("unmapped_code", "UNMAPPED".to_string())?,
            pass_labels: c.get("pass_labels").unwrap_or("good").split(',').map(|s| s.trim().to_string()).collect(),
        })
    }

    fn process(&self, output: ModelOutput, _: &Metadata) -> Result<Decision, String> {
        let ModelOutput::Classification(scores) = output else {
            return Err("defect-codes handles classification output only".into());
        };
        let is_pass = |label: &str| self.pass_labels.iter().any(|p| p == label);
        let threshold = |label: &str| self.thresholds.get(label).copied().unwrap_or(self.threshold);
        let defects: Vec<Defect> = scores
            .iter()
            .filter(|s| !is_pass(&s.label) && s.score >= threshold(&s.label))
            .map(|s| Defect {
                code: self.codes.get(&s.label).unwrap_or(&self.unmapped).clone(),
                label: s.label.clone(),
                severity: self.severity.get(&s.label).copied().unwrap_or(1.0),
                score: s.score,
                region: None,
            })
            .collect();
        let top = scores.iter().max_by(|a, b| a.score.total_cmp(&b.score));
        let verdict = match top {
            _ if !defects.is_empty() => Verdict::Fail,
            Some(t) if is_pass(&t.label) && t.score >= threshold(&t.label) => Verdict::Pass,
            _ => Verdict::Review,
        };
        Ok(Decision { verdict, defects, extra: vec![("rule".into(), "defect-codes/0.1".into())] })
    }
}

lineside_plugin_sdk::postprocessor!(DefectCodes);
