"""Check that DALI, installed from the wheels the GPU suite carries and nothing else, imports and
decodes JPEG photographs on the CPU to the same pixels as PIL (within decoder tolerance).

    python check_dali.py PHOTO_DIR      (run by benchmarks/gpu/prepare.sh in a bare Python 3.12 venv)
"""
import glob
import io
import os
import sys

import numpy as np
from PIL import Image


def main(photo_dir: str) -> int:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def, __version__

    paths = sorted(glob.glob(os.path.join(photo_dir, "*.jpg")))[:4]
    if not paths:
        raise SystemExit(f"check_dali: no JPEGs in {photo_dir}")
    blobs = []
    for p in paths:  # re-encode smaller: the check is about the decoder, not the photo size
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((320, 240)).save(buf, format="JPEG", quality=90)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))

    @pipeline_def(batch_size=len(blobs), num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: blobs, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    worst = 0.0
    for i, blob in enumerate(blobs):
        dali_px = np.asarray(out.at(i)).astype(np.int16)
        pil_px = np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB")).astype(np.int16)
        if dali_px.shape != pil_px.shape:
            raise SystemExit(f"check_dali: shape {dali_px.shape} vs PIL {pil_px.shape}")
        worst = max(worst, float(np.abs(dali_px - pil_px).mean()))
    if worst > 2.0:  # libjpeg-turbo vs PIL's libjpeg differ in IDCT/upsampling rounding only
        raise SystemExit(f"check_dali: mean |DALI - PIL| = {worst:.2f} > 2 grey levels")
    print(f"[check_dali] DALI {__version__} (Python {sys.version.split()[0]}) decoded {len(blobs)} JPEGs on the "
          f"CPU; mean |DALI - PIL| <= {worst:.2f} grey levels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
