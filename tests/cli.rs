//! The `lineside models verify` command against the reference folders.

mod common;

use std::process::Command;

use common::shared;

fn verify(source: &str) -> (bool, String) {
    verify_with(source, &[])
}

fn verify_with(source: &str, flags: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_lineside")).args(["models", "verify", source]).args(flags).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn verify_passes_on_matching_references_and_fails_on_a_mismatch() {
    let good = shared().join("models/test_resnet.random6");
    let (ok, text) = verify(&good.display().to_string());
    assert!(ok, "{text}");
    assert!(
        text.contains("test_resnet loads") && text.contains("features.4") && text.contains("top-1 matches"),
        "{text}"
    );

    // The same weights judged against another model's reference outputs.
    let scratch = tempfile::Builder::new().prefix("lineside-test-verify").tempdir().unwrap();
    let dir = scratch.path();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(good.join(f), dir.join(f)).unwrap();
    }
    let mut refs = candle_core::safetensors::load(good.join("ref.safetensors"), &candle_core::Device::Cpu).unwrap();
    let logits = refs["logits"].clone();
    refs.insert("logits".into(), (logits + 1.0).unwrap());
    candle_core::safetensors::save(&refs, dir.join("ref.safetensors")).unwrap();
    let (ok, text) = verify(&dir.display().to_string());
    assert!(!ok, "a shifted reference must fail: {text}");
    assert!(text.contains("MISMATCH") && text.contains("does not match its reference"), "{text}");
}

/// `--kernels candle` checks the network code a GPU runs, here on the CPU;
/// `--device` names where the model is checked.
#[test]
fn verify_checks_candle_ops_and_names_the_device() {
    let good = shared().join("models/test_resnet.random6").display().to_string();
    let (ok, text) = verify_with(&good, &["--kernels", "candle"]);
    assert!(ok, "{text}");
    assert!(text.contains("on cpu, candle kernels") && text.contains("top-1 matches"), "{text}");
    let (ok, text) = verify(&good);
    assert!(ok && text.contains("on cpu, lineside kernels"), "{text}");

    let (ok, text) = verify_with(&good, &["--kernels", "onnx"]);
    assert!(!ok && text.contains("expected `lineside` or `candle`"), "{text}");
    if !lineside_inference::ComputeDevice::cuda_built() {
        let (ok, text) = verify_with(&good, &["--device", "cuda:0"]);
        assert!(!ok && text.contains("cuda:0") && text.contains("--features cuda"), "{text}");
    }
}
