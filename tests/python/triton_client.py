"""Drives lineside with NVIDIA's own `tritonclient[http]`, unchanged, binary
data on (its default). Run by tests/oip.rs; prints one JSON object of what it
saw for the Rust side to compare with /v1.

usage: triton_client.py URL MODEL IMAGE_FILE PIXELS_FILE SIDE MEAN STD CROP
  IMAGE_FILE   an encoded image (sent as the BYTES input `IMAGE`)
  PIXELS_FILE  the same image's raw RGB8 pixels, SIDE x SIDE
  MEAN, STD    comma-separated, per channel; CROP the model's input side
"""

import json
import sys

import numpy as np
import tritonclient.http as http


def text(x):
    """A BYTES element: bytes when sent as binary data, str when sent as JSON."""
    return x.decode() if isinstance(x, bytes) else x


def main():
    url, model, image_file, pixels_file, side, mean, std, crop = sys.argv[1:]
    side, crop = int(side), int(crop)
    mean = np.array([float(x) for x in mean.split(",")], dtype=np.float32)
    std = np.array([float(x) for x in std.split(",")], dtype=np.float32)
    client = http.InferenceServerClient(url)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(),
        "model_ready": client.is_model_ready(model),
        "metadata": client.get_model_metadata(model),
    }

    # An encoded image, as a BYTES tensor: the whole pipeline runs.
    with open(image_file, "rb") as f:
        encoded = f.read()
    image = http.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([encoded], dtype=np.object_))
    result = client.infer(model, [image])
    out["bytes"] = {
        "scores": result.as_numpy("scores")[0].tolist(),
        "label": text(result.as_numpy("label")[0]),
        "verdict": text(result.as_numpy("verdict")[0]),
        "inspection": json.loads(text(result.as_numpy("inspection")[0])),
    }

    # The same image preprocessed here (centre crop, scale, normalise), as FP32.
    pixels = np.fromfile(pixels_file, dtype=np.uint8).reshape(side, side, 3)
    top = (side - crop) // 2
    x = pixels[top : top + crop, top : top + crop].astype(np.float32) / 255.0
    x = ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    tensor = http.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    outputs = [
        http.InferRequestedOutput("scores"),
        http.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer(model, [tensor], outputs=outputs)
    out["fp32"] = {
        "scores": result.as_numpy("scores")[0].tolist(),
        "label": text(result.as_numpy("label")[0]),
        "outputs": [o["name"] for o in result.get_response()["outputs"]],
    }

    # An unknown model is an error the client reports, not a crash.
    try:
        client.get_model_metadata("no-such-model")
        out["unknown_model_error"] = None
    except Exception as e:  # tritonclient raises InferenceServerException
        out["unknown_model_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
