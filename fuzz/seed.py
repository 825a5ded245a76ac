#!/usr/bin/env python3
"""Writes the seed inputs of each fuzz target into fuzz/corpus/<target>/.

Seeds are small, valid examples of what each target parses, so the fuzzer
starts from inputs that reach deep code. The JPEG test fixtures are copied
in too (committed once, under inference/tests). With ../shared present, a few NEU
JPEGs seed the decoder too (they stay out of git: see fuzz/.gitignore).
Standard library only.
"""
import json
import pathlib
import shutil
import struct
import zlib

root = pathlib.Path(__file__).resolve().parent
corpus = root / "corpus"


def put(target, name, data):
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def png(w, h, color_type=2):
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    raw = b"".join(b"\x00" + bytes((x * 37 + y * 11) % 256 for x in range(w * channels)) for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bmp(w, h):
    row = bytes((x * 7) % 256 for x in range(w * 3))
    row += b"\x00" * ((4 - len(row) % 4) % 4)
    pixels = row * h
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


# decode_preprocess: images in several formats and shapes.
put("decode_preprocess", "rgb-16x16.png", png(16, 16))
put("decode_preprocess", "gray-9x300.png", png(9, 300, 0))
put("decode_preprocess", "rgba-64x8.png", png(64, 8, 6))
put("decode_preprocess", "rgb-20x12.bmp", bmp(20, 12))
# The JPEG test fixtures: baseline 4:2:0, CMYK, progressive and restart-marker
# files, so mutations start from each colour and scan layout they hold. No seed
# is a greyscale JPEG (the NEU images are stored as colour); the unit tests
# cover grey ones.
for jpeg in sorted((root.parent / "inference/tests/fixtures/jpeg").glob("*.jpg")):
    shutil.copy(jpeg, corpus / "decode_preprocess" / f"fixture-{jpeg.name}")
neu = root.parent.parent / "shared/data/neu-det/NEU-DET/IMAGES"
for name in ["crazing_1.jpg", "scratches_1.jpg"]:
    if (neu / name).is_file():
        shutil.copy(neu / name, corpus / "decode_preprocess" / f"neu-{name}")

# multipart: the first byte picks the Content-Type (0: boundary=X).
image = png(8, 8)
form = b"--X\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\nContent-Type: image/png\r\n\r\n" + image + b"\r\n--X--\r\n"
put("multipart", "image-field", b"\x00" + form)
put("multipart", "other-field", b"\x00" + form.replace(b'name="image"', b'name="note"'))
put("multipart", "raw-jpeg", b"\x03" + image)

# oip_request: the first byte gives the JSON header's share of the body (0: all JSON).
def binary_request(inputs_tail):
    inputs, tail = inputs_tail
    head = json.dumps({"id": "1", "inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    body = head + tail
    return bytes([max(1, min(255, round(255 * len(head) / len(body))))]) + body

element = struct.pack("<I", len(image)) + image
put("oip_request", "bytes-binary", binary_request(([{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}], element)))
put("oip_request", "fp32-json", b"\x00" + json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}], "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode())
put("oip_request", "bytes-base64", b"\x00" + json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"}, "data": ["aGVsbG8="]}]}).encode())
print(f"seeds written under {corpus}")
