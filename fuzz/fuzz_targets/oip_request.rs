//! Any body as a KServe v2 inference request, with or without Triton's
//! binary-data header length: parse, then encode a response shaped by it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lineside::oip::protocol::{OutData, Output, encode_response, parse_request};

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    // 0: a plain JSON body; otherwise the JSON header's length, as a share of the body.
    let header_len = (split != 0).then(|| body.len() * split as usize / 255);
    let Ok(req) = parse_request(&Bytes::copy_from_slice(body), header_len) else { return };
    let outputs: Vec<Output> = req
        .outputs
        .iter()
        .flatten()
        .map(|r| Output {
            name: r.name.clone(),
            shape: vec![1],
            data: OutData::Bytes(vec![r.name.as_bytes().to_vec()]),
        })
        .collect();
    let _ = encode_response("m", "1", req.id.as_deref(), &outputs, |n| n.len() % 2 == 0);
});
