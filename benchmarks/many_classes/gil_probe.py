"""Do the decode's and classify's kernels release the GIL? A pure-Python thread counts while the
main thread makes one long call of each (a 3000x3000 JPEG decode, a resize to 64x64, a
2000x500x4096 cdist p=1): a count that goes on at its rate alone means the call released the GIL,
so threads within a task (tried for issue 33, not kept) could run in parallel.

    python benchmarks/many_classes/gil_probe.py
"""
import threading, time, io, numpy as np, simplejpeg, torch
from PIL import Image
torch.set_num_threads(1)
rng = np.random.default_rng(0)
big = rng.integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
jpeg = simplejpeg.encode_jpeg(big, quality=90)
img = Image.fromarray(big)
a, b = torch.rand(2000, 4096), torch.rand(500, 4096)
count = [0]; stop = [False]
def spin():
    while not stop[0]:
        count[0] += 1
t = threading.Thread(target=spin); t.start(); time.sleep(0.2)
for name, call in [("simplejpeg.decode_jpeg 3000x3000", lambda: simplejpeg.decode_jpeg(jpeg, colorspace="RGB")),
                   ("Pillow resize 3000x3000 -> 64x64", lambda: img.resize((64, 64), Image.Resampling.BILINEAR)),
                   ("torch.cdist p=1 2000x500x4096", lambda: torch.cdist(a, b, p=1))]:
    for _ in range(2):
        c0 = count[0]; w = time.perf_counter(); call(); w = time.perf_counter() - w; c1 = count[0]
        print(f"{name}: {w*1000:.0f} ms, spinning thread advanced {c1 - c0:,} steps ({(c1-c0)/w/1e6:.1f} M/s)")
stop[0] = True; t.join()
# baseline: spinning rate alone
count[0] = 0; stop[0] = False; t = threading.Thread(target=spin); t.start(); time.sleep(0.5); stop[0] = True; t.join()
print(f"spinning alone: {count[0]/0.5/1e6:.1f} M/s")
