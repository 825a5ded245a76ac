//! Threshold-free and thresholded scores for evaluation.

/// Area under the ROC curve of `scores` for binary `labels` (true =
/// anomalous). Tied scores count half, as in scikit-learn. `None` when one
/// class is missing.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mann-Whitney U: sum of the positives' ranks, ties given their average rank.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// F1 of "anomalous if score ≥ threshold".
pub fn f1_at(scores: &[f32], labels: &[bool], threshold: f32) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0f64, 0f64, 0f64);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s >= threshold, l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            (false, false) => {}
        }
    }
    if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) }
}

/// The threshold with the best F1 among the observed scores (anomalib's
/// F1-adaptive threshold), and that F1. One sort and one sweep, so it works
/// on millions of pixel scores.
pub fn best_f1(scores: &[f32], labels: &[bool]) -> (f32, f64) {
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0f64, 0f64);
    let mut best = (f32::INFINITY, 0.0);
    let mut i = 0;
    while i < order.len() {
        // Everything at or above this score is called anomalous.
        let t = scores[order[i]];
        while i < order.len() && scores[order[i]] == t {
            if labels[order[i]] {
                tp += 1.0
            } else {
                fp += 1.0
            }
            i += 1;
        }
        let f1 = if tp == 0.0 { 0.0 } else { 2.0 * tp / (tp + fp + positives) };
        if f1 > best.1 {
            best = (t, f1);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_matches_hand_computed_cases() {
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        // sklearn.metrics.roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) == 0.75
        assert_eq!(auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
        // All tied: chance.
        assert_eq!(auroc(&[0.5; 4], &[false, true, false, true]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.6], &[true, true]), None);
    }

    #[test]
    fn f1_and_best_threshold() {
        let s = [0.1, 0.4, 0.35, 0.8];
        let l = [false, false, true, true];
        assert!((f1_at(&s, &l, 0.5) - 2.0 / 3.0).abs() < 1e-9);
        let (t, f) = best_f1(&s, &l);
        assert_eq!(t, 0.35);
        assert!((f - 0.8).abs() < 1e-9);
        // Agrees with the brute force over every threshold.
        let s: Vec<f32> = (0..200).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let l: Vec<bool> = (0..200).map(|i| (i * 13) % 7 < 3).collect();
        let brute = s.iter().map(|&t| f1_at(&s, &l, t)).fold(0.0, f64::max);
        assert!((best_f1(&s, &l).1 - brute).abs() < 1e-12);
    }
}
