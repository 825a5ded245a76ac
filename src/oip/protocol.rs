//! The Open Inference Protocol's (KServe v2) inference messages over HTTP:
//! JSON tensors and Triton's binary-data extension.
//!
//! With the extension, the body is a JSON header of
//! `Inference-Header-Content-Length` bytes followed by the binary inputs in
//! order; an input with `parameters.binary_data_size` takes its data from
//! there. BYTES elements, in JSON or binary, are each a 4-byte little-endian
//! length and the bytes. Pure functions over bytes, so they can be fuzzed.

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Header with the length of the JSON part of a body that carries binary tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Most dimensions a tensor may have.
const MAX_DIMS: usize = 8;

/// Why a request is not a valid inference request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Tensor data of the datatypes this server takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// `BYTES`: one byte string per element (encoded images).
    Bytes(Vec<Bytes>),
    /// `FP32`, row-major.
    Fp32(Vec<f32>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Bytes(v) => v.len(),
            Data::Fp32(v) => v.len(),
        }
    }
}

/// One input tensor, its element count checked against its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    pub name: String,
    /// Send it as binary data after the JSON header.
    pub binary: bool,
}

/// A parsed inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<Input>,
    /// `None`: every output, binary when `binary_data_output` is set.
    pub outputs: Option<Vec<Requested>>,
    /// Request-level `binary_data_output`.
    pub binary_output: bool,
    /// Triton's `timeout` parameter, in microseconds.
    pub timeout_us: Option<u64>,
}

#[derive(Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Parses a request body; `header_len` is `Inference-Header-Content-Length`.
pub fn parse_request(body: &Bytes, header_len: Option<usize>) -> Result<InferRequest, ProtocolError> {
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return err(format!("{HEADER_LENGTH} is {json_len} but the body has {} bytes", body.len()));
    }
    let req: RequestJson = serde_json::from_slice(&body[..json_len])
        .map_err(|e| ProtocolError(format!("the inference request is not valid JSON: {e}")))?;
    let mut binary = body.slice(json_len..);
    let inputs = req.inputs.into_iter().map(|i| input(i, &mut binary)).collect::<Result<Vec<_>, _>>()?;
    if !binary.is_empty() {
        return err(format!("{} bytes of binary data follow the inputs that declared theirs", binary.len()));
    }
    let flag = |p: &Map<String, Value>, k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
    let binary_output = flag(&req.parameters, "binary_data_output");
    let outputs = req.outputs.map(|outs| {
        outs.into_iter()
            .map(|o| Requested {
                binary: o.parameters.get("binary_data").and_then(Value::as_bool).unwrap_or(binary_output),
                name: o.name,
            })
            .collect()
    });
    let timeout_us = req.parameters.get("timeout").and_then(Value::as_u64);
    Ok(InferRequest { id: req.id, inputs, outputs, binary_output, timeout_us })
}

fn input(i: InputJson, binary: &mut Bytes) -> Result<Input, ProtocolError> {
    let name = i.name;
    if i.shape.len() > MAX_DIMS {
        return err(format!("input `{name}`: at most {MAX_DIMS} dimensions"));
    }
    let shape: Vec<usize> = i
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| ProtocolError(format!("input `{name}`: negative dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let count = count.ok_or_else(|| ProtocolError(format!("input `{name}`: the shape {shape:?} is too large")))?;
    let binary_size = match i.parameters.get("binary_data_size") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| ProtocolError(format!("input `{name}`: binary_data_size must be a whole number")))?,
        ),
    };
    let data = match (binary_size, i.data) {
        (Some(_), Some(_)) => return err(format!("input `{name}`: give `data` or binary_data_size, not both")),
        (None, None) => return err(format!("input `{name}` has no `data` and no binary_data_size")),
        (Some(n), None) => {
            if n > binary.len() {
                return err(format!("input `{name}`: binary_data_size {n} but {} bytes are left", binary.len()));
            }
            let raw = binary.split_to(n);
            from_binary(&name, &i.datatype, raw)?
        }
        (None, Some(v)) => from_json(&name, &i.datatype, &i.parameters, v, count)?,
    };
    if data.len() != count {
        return err(format!("input `{name}`: shape {shape:?} holds {count} elements but {} were sent", data.len()));
    }
    Ok(Input { name, shape, data })
}

fn unsupported(name: &str, datatype: &str) -> ProtocolError {
    ProtocolError(format!(
        "input `{name}`: datatype {datatype} is not accepted; send BYTES (encoded images) or FP32 (a preprocessed tensor)"
    ))
}

fn from_binary(name: &str, datatype: &str, mut raw: Bytes) -> Result<Data, ProtocolError> {
    match datatype {
        "FP32" => {
            if !raw.len().is_multiple_of(4) {
                return err(format!("input `{name}`: {} bytes is not a whole number of FP32 values", raw.len()));
            }
            Ok(Data::Fp32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        }
        "BYTES" => {
            let mut items = Vec::new();
            while !raw.is_empty() {
                if raw.len() < 4 {
                    return err(format!("input `{name}`: a BYTES element is cut short in its length prefix"));
                }
                let n = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
                let _ = raw.split_to(4);
                if n > raw.len() {
                    return err(format!("input `{name}`: a BYTES element of {n} bytes has only {} left", raw.len()));
                }
                items.push(raw.split_to(n));
            }
            Ok(Data::Bytes(items))
        }
        other => Err(unsupported(name, other)),
    }
}

fn from_json(
    name: &str,
    datatype: &str,
    params: &Map<String, Value>,
    v: Value,
    count: usize,
) -> Result<Data, ProtocolError> {
    let mut flat = Vec::with_capacity(count.min(1 << 20));
    flatten(v, &mut flat);
    match datatype {
        "FP32" => flat
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .map(Data::Fp32)
            .ok_or_else(|| ProtocolError(format!("input `{name}`: FP32 data must be numbers"))),
        "BYTES" => {
            let base64 = params.get("content_type").and_then(Value::as_str) == Some("base64");
            let item = |x: &Value| -> Result<Bytes, ProtocolError> {
                let s =
                    x.as_str().ok_or_else(|| ProtocolError(format!("input `{name}`: BYTES data must be strings")))?;
                match base64 {
                    true => base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map(Bytes::from)
                        .map_err(|e| ProtocolError(format!("input `{name}`: not base64: {e}"))),
                    false => Ok(Bytes::copy_from_slice(s.as_bytes())),
                }
            };
            flat.iter().map(item).collect::<Result<Vec<_>, _>>().map(Data::Bytes)
        }
        other => Err(unsupported(name, other)),
    }
}

/// Row-major elements of nested JSON arrays.
fn flatten(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.into_iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

/// Output tensor data.
#[derive(Debug, Clone, PartialEq)]
pub enum OutData {
    Bytes(Vec<Vec<u8>>),
    Fp32(Vec<f32>),
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: OutData,
}

/// A response body, and the value of `Inference-Header-Content-Length` when
/// binary outputs follow the JSON.
pub struct Encoded {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Encodes a response: `binary(name)` says which outputs go as binary data.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[Output],
    binary: impl Fn(&str) -> bool,
) -> Encoded {
    let mut tail = Vec::new();
    let tensors: Vec<Value> = outputs
        .iter()
        .map(|o| {
            let datatype = match &o.data {
                OutData::Bytes(_) => "BYTES",
                OutData::Fp32(_) => "FP32",
            };
            let mut t = json!({ "name": o.name, "datatype": datatype, "shape": o.shape });
            if binary(&o.name) {
                let start = tail.len();
                match &o.data {
                    OutData::Fp32(v) => v.iter().for_each(|x| tail.extend_from_slice(&x.to_le_bytes())),
                    OutData::Bytes(v) => v.iter().for_each(|b| {
                        tail.extend_from_slice(&(b.len() as u32).to_le_bytes());
                        tail.extend_from_slice(b);
                    }),
                }
                t["parameters"] = json!({ "binary_data_size": tail.len() - start });
            } else {
                t["data"] = match &o.data {
                    OutData::Fp32(v) => json!(v),
                    OutData::Bytes(v) => json!(v.iter().map(|b| String::from_utf8_lossy(b)).collect::<Vec<_>>()),
                };
            }
            t
        })
        .collect();
    let mut head = json!({ "model_name": model, "model_version": version, "outputs": tensors });
    if let Some(id) = id {
        head["id"] = json!(id);
    }
    let mut body = serde_json::to_vec(&head).expect("JSON of plain values");
    if tail.is_empty() {
        return Encoded { body, header_len: None };
    }
    let header_len = body.len();
    body.extend_from_slice(&tail);
    Encoded { body, header_len: Some(header_len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_element(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn binary_inputs_follow_the_json_header_in_order() {
        let head = r#"{"inputs":[{"name":"IMAGE","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":13}},
            {"name":"INPUT","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}],
            "parameters":{"binary_data_output":true}}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend(bytes_element(b"abc"));
        body.extend(bytes_element(b"de"));
        body.extend(1.5f32.to_le_bytes());
        body.extend((-2.0f32).to_le_bytes());
        let r = parse_request(&Bytes::from(body), Some(head.len())).unwrap();
        assert_eq!(r.inputs[0].data, Data::Bytes(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")]));
        assert_eq!(r.inputs[1].data, Data::Fp32(vec![1.5, -2.0]));
        assert!(r.binary_output && r.outputs.is_none());
    }

    #[test]
    fn json_tensors_and_requested_outputs() {
        let body = r#"{"id":"7","inputs":[{"name":"INPUT","shape":[1,2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}],
            "outputs":[{"name":"scores","parameters":{"binary_data":true}},{"name":"label"}]}"#;
        let r = parse_request(&Bytes::from(body), None).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].data, Data::Fp32(vec![1.0, 2.0, 3.0, 4.5]));
        let outs = r.outputs.unwrap();
        assert!(outs[0].binary && !outs[1].binary);
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let cases: &[(&str, Option<usize>)] = &[
            (r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None),
            (r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#, None),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1]}]}"#, None),
            (
                r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","data":[1]}]}"#,
                None,
            ),
            (r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}"#, None),
            (r#"{"inputs":[]"#, None),
            (r#"{"inputs":[]}"#, Some(99)),
        ];
        for (body, len) in cases {
            assert!(parse_request(&Bytes::from(*body), *len).is_err(), "{body}");
        }
        // A BYTES element whose length prefix runs past the data.
        let head = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend(100u32.to_le_bytes());
        body.extend(b"ab");
        assert!(parse_request(&Bytes::from(body), Some(head.len())).is_err());
    }

    #[test]
    fn responses_put_binary_outputs_after_the_header() {
        let outs = vec![
            Output { name: "scores".into(), shape: vec![1, 2], data: OutData::Fp32(vec![0.25, 0.75]) },
            Output { name: "label".into(), shape: vec![1], data: OutData::Bytes(vec![b"ok".to_vec()]) },
        ];
        let e = encode_response("m", "1", Some("r"), &outs, |n| n == "scores");
        let n = e.header_len.unwrap();
        let head: Value = serde_json::from_slice(&e.body[..n]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(head["outputs"][1]["data"][0], "ok");
        assert_eq!(&e.body[n..n + 4], &0.25f32.to_le_bytes());
        assert!(encode_response("m", "1", None, &outs, |_| false).header_len.is_none());
    }
}
