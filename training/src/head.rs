//! timm's classifier head as trainable candle variables:
//! `conv_head` (1×1) → `bn2` (eval statistics, trainable affine) → ReLU6 →
//! global average pool → dropout → `classifier`.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::TrainConfig;
use crate::features::FeatureSet;

const DROPOUT: f32 = 0.2;

/// The trainable head.
pub struct Head {
    conv_w: Var,
    gamma: Var,
    beta: Var,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    cls_w: Var,
    cls_b: Var,
    seed: u64,
}

impl Head {
    /// Starts from the backbone's pretrained `conv_head` and `bn2`, with a new
    /// `classes`-way classifier.
    pub fn from_pretrained(raw: &HashMap<String, Tensor>, classes: usize, eps: f64, seed: u64) -> anyhow::Result<Self> {
        let get = |k: &str| {
            raw.get(k).ok_or_else(|| anyhow::anyhow!("backbone lacks `{k}`")).and_then(|t| Ok(t.to_dtype(DType::F32)?))
        };
        let conv = get("conv_head.weight")?;
        let (out, inp, _, _) = conv.dims4()?;
        let device = Device::Cpu;
        Ok(Self {
            conv_w: Var::from_tensor(&conv.reshape((out, inp))?)?,
            gamma: Var::from_tensor(&get("bn2.weight")?)?,
            beta: Var::from_tensor(&get("bn2.bias")?)?,
            running_mean: get("bn2.running_mean")?,
            running_var: get("bn2.running_var")?,
            eps,
            cls_w: Var::from_tensor(&(Tensor::randn(0f32, 1.0, (classes, out), &device)? * 0.01)?)?,
            cls_b: Var::zeros(classes, DType::F32, &device)?,
            seed,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.conv_w.clone(), self.gamma.clone(), self.beta.clone(), self.cls_w.clone(), self.cls_b.clone()]
    }

    /// Logits for `[B, C, H, W]` features.
    pub fn forward(&self, x: &Tensor, train: bool) -> anyhow::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // Channels-last so the 1×1 conv is one large GEMM (and its gradient another)
        // rather than a broadcast batch of small ones.
        let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        let y = rows.matmul(&self.conv_w.as_tensor().t()?)?;
        let scale = self.gamma.as_tensor().div(&(&self.running_var + self.eps)?.sqrt()?)?;
        let shift = (self.beta.as_tensor() - self.running_mean.mul(&scale)?)?;
        let y = y.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        let n = scale.dim(0)?;
        let mut pooled = y.clamp(0f32, 6f32)?.reshape((b, h * w, n))?.mean(1)?;
        if train {
            pooled = candle_nn::ops::dropout(&pooled, DROPOUT)?;
        }
        Ok(pooled.matmul(&self.cls_w.as_tensor().t()?)?.broadcast_add(self.cls_b.as_tensor())?)
    }

    /// AdamW with a cosine learning-rate schedule; prints held-out accuracy each epoch.
    pub fn fit(&mut self, train: &FeatureSet, val: &FeatureSet, cfg: &TrainConfig) -> anyhow::Result<()> {
        let params = ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() };
        let mut opt = AdamW::new(self.vars(), params)?;
        let n = train.labels.len();
        let steps_per_epoch = n.div_ceil(cfg.batch_size);
        let total = (steps_per_epoch * cfg.epochs) as f64;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut order: Vec<u32> = (0..n as u32).collect();
        let labels = Tensor::new(train.labels.as_slice(), &Device::Cpu)?;
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} steps (eta {eta})")?.progress_chars("=> "),
        );
        let mut step = 0usize;
        for epoch in 1..=cfg.epochs {
            order.shuffle(&mut rng);
            let mut loss_sum = 0f64;
            for idx in order.chunks(cfg.batch_size) {
                let lr = cfg.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total).cos());
                opt.set_learning_rate(lr);
                let idx = Tensor::new(idx, &Device::Cpu)?;
                let x = train.features.index_select(&idx, 0)?;
                let y = labels.index_select(&idx, 0)?;
                let loss = candle_nn::loss::cross_entropy(&self.forward(&x, true)?, &y)?;
                opt.backward_step(&loss)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                step += 1;
                bar.inc(1);
            }
            let acc = self.accuracy(val)?;
            bar.set_message(format!("epoch {epoch}/{}", cfg.epochs));
            let loss = loss_sum / steps_per_epoch as f64;
            // The bar hides itself when stderr is not a terminal; the log line always shows.
            bar.suspend(|| {
                tracing::info!(epoch, loss = format!("{loss:.4}"), held_out_top1 = format!("{:.2}%", acc * 100.0))
            });
        }
        bar.finish();
        Ok(())
    }

    /// Top-1 accuracy on cached features.
    pub fn accuracy(&self, set: &FeatureSet) -> anyhow::Result<f64> {
        let mut correct = 0usize;
        let n = set.labels.len();
        for start in (0..n).step_by(256) {
            let len = (n - start).min(256);
            let pred =
                self.forward(&set.features.narrow(0, start, len)?, false)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&set.labels[start..start + len]).filter(|(p, l)| p == l).count();
        }
        Ok(correct as f64 / n as f64)
    }

    /// The head's tensors under timm's names.
    pub fn tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let w = self.conv_w.as_tensor();
        let (o, i) = w.dims2()?;
        Ok(vec![
            ("conv_head.weight".into(), w.reshape((o, i, 1, 1))?),
            ("bn2.weight".into(), self.gamma.as_tensor().clone()),
            ("bn2.bias".into(), self.beta.as_tensor().clone()),
            ("classifier.weight".into(), self.cls_w.as_tensor().clone()),
            ("classifier.bias".into(), self.cls_b.as_tensor().clone()),
        ])
    }
}
