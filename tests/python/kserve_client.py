"""Drives lineside with KServe's own Python client (`kserve`, its v2 REST
client), unchanged, binary data on. Run by tests/oip.rs (ignored by default:
the kserve package is about 450 MB); prints what it saw as JSON, in the same
shape as triton_client.py.

usage: kserve_client.py URL MODEL IMAGE_FILE PIXELS_FILE SIDE MEAN STD CROP
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


def text(x):
    return x.decode() if isinstance(x, bytes) else x


def outputs(response):
    return {o.name: o.as_numpy() for o in response.outputs}


async def main():
    url, model, image_file, pixels_file, side, mean, std, crop = sys.argv[1:]
    url = "http://" + url
    side, crop = int(side), int(crop)
    mean = np.array([float(x) for x in mean.split(",")], dtype=np.float32)
    std = np.array([float(x) for x in std.split(",")], dtype=np.float32)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    out = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, model),
    }

    with open(image_file, "rb") as f:
        encoded = f.read()
    image = InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([encoded], dtype=np.object_), binary_data=True)
    request = InferRequest(model_name=model, infer_inputs=[image])
    got = outputs(await client.infer(url, request, model_name=model))
    out["bytes"] = {
        "scores": got["scores"][0].tolist(),
        "label": text(got["label"][0]),
        "verdict": text(got["verdict"][0]),
        "inspection": json.loads(text(got["inspection"][0])),
    }

    pixels = np.fromfile(pixels_file, dtype=np.uint8).reshape(side, side, 3)
    top = (side - crop) // 2
    x = pixels[top : top + crop, top : top + crop].astype(np.float32) / 255.0
    x = ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    tensor = InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    request = InferRequest(model_name=model, infer_inputs=[tensor])
    response = await client.infer(url, request, model_name=model)
    got = outputs(response)
    out["fp32"] = {
        "scores": got["scores"][0].tolist(),
        "label": text(got["label"][0]),
        "outputs": [o.name for o in response.outputs],
    }
    await client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
