"""How much squashing a photograph to a square (the reference's visualize_attention.py resizes every image to
480x480) changes the attention masks, against the photograph with its aspect ratio kept (what the notebook
draws): for the demo checkpoint's teacher on the notebook's scikit-image photographs at 4 x img_size, the
Jaccard similarity (IoU) of each mask (the mean of the heads, then each head; cfg.attn_threshold of the mass)
with the squashed picture's mask mapped back to the photograph's shape. The notebook's *What differs from the
reference code* quotes it.

    python tests/benchmarks/check_attention_squash.py [--checkpoint checkpoints/demo_vit_tiny8.pth]
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbloader import bench_header, load_notebook  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/demo_vit_tiny8.pth")
    a = p.parse_args()
    if not Path(a.checkpoint).is_file():
        p.error(f"--checkpoint={a.checkpoint}: no such file")
    nb = load_notebook()
    cfg = nb.make_config("demo")
    teacher = nb.backbone_from_checkpoint(a.checkpoint)
    teacher = (teacher[0] if isinstance(teacher, tuple) else teacher).eval()
    side = 4 * cfg.img_size
    print(bench_header(), flush=True)
    print(f"{a.checkpoint}, photographs with the long side "
          f"{side} px, masks holding {cfg.attn_threshold} of the mass")
    for name in nb.ATTENTION_PHOTOS:
        photo = nb.photo_for_attention(name, side)
        kept = nb.attention_row(teacher, photo, cfg.attn_threshold)[2]
        squashed = nb.attention_row(teacher, cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA),
                                    cfg.attn_threshold)[2]
        ious = []
        for mask, other in zip(kept, squashed):
            back = cv2.resize(other.astype(np.uint8), (mask.shape[1], mask.shape[0]),
                              interpolation=cv2.INTER_NEAREST) > 0
            ious.append((mask & back).sum() / max(1, (mask | back).sum()))
        print(f"  {name:10s} {photo.shape[1]}x{photo.shape[0]}: IoU mean of heads {ious[0]:.3f}, heads "
              f"{', '.join(f'{x:.3f}' for x in ious[1:])}")


if __name__ == "__main__":
    main()
