"""Does the prepared base *see* an object's shape? Linear probes at three depths.

Usage: python studies/scenes/vision_probe.py OUT.json [--stage K] [hydra overrides ...]
e.g.   python studies/scenes/vision_probe.py out/v.json data=scenes model=scenes_cpu

Builds the run's base exactly as ``engine=central`` does (same preparation cache), takes
stage K's questions whose queried object is known (its box, and its shape and colour
named by the question or the answer: colour, shape and position questions), and fits
a multinomial logistic regression (a linear probe, Alain & Bengio 2016) from three
representations of that object to its shape and to its colour:

- ``pixels``: the object's box cropped from the image and resized to 16 x 16 (what
  the image holds; a sanity bound);
- ``vision``: the vision tower's last hidden states, averaged over the patches the
  box covers;
- ``projected``: the image tokens the language model receives (after the projector),
  averaged the same way.

Training rows fit the probe, test rows score it (accuracy next to chance). Where
``pixels`` decodes shape and ``projected`` does not, the preparation never made the
vision tower encode it; where ``projected`` decodes it and the VQA accuracy stays at
chance, the language model does not read it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from base_engine import central_engine
from torch import Tensor

from fed_asr.central import CentralEngine
from fed_asr.data import VQASample
from fed_asr.data.regions import region_masks
from fed_asr.data.scene_render import COLOR_NAMES, SHAPES
from fed_asr.models.device import move_batch
from fed_asr.models.scoring import sample_skill

CROP = 16  # side of the resized object crop of the pixel probe


def object_labels(sample: VQASample) -> tuple[str, str] | None:
    """(shape, colour) of the queried object, from the question and answer words."""
    if sample.region is None or sample_skill(sample) not in (
        "color",
        "shape",
        "position",
    ):
        return None
    words = sample.question.rstrip("?").split() + [sample.answer]
    shapes = [w for w in words if w in SHAPES]
    colors = [w for w in words if w in COLOR_NAMES]
    if len(shapes) != 1 or len(colors) != 1:
        return None
    return shapes[0], colors[0]


@torch.no_grad()
def features(
    engine: CentralEngine, samples: Sequence[VQASample], batch_size: int = 32
) -> dict[str, Tensor]:
    """(N, F) pixel-crop, vision-tower and projected features of the queried objects."""
    llava = engine.model.get_base_model().model
    out: dict[str, list[Tensor]] = {"pixels": [], "vision": [], "projected": []}
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        batch = move_batch(engine.collator(chunk), "cpu")
        pixels = batch["pixel_values"].float()  # (B, 3, H, W)
        hidden = llava.vision_tower(pixels).last_hidden_state[:, 1:]  # (B, P, Dv)
        projected = llava.multi_modal_projector(hidden)  # (B, P, Dt)
        side = int(hidden.shape[1] ** 0.5)
        masks, _ = region_masks(chunk, (side, side))  # (B, G, G)
        weights = masks.flatten(1).float()
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)  # (B, P)
        out["vision"].append(torch.einsum("bp,bpd->bd", weights, hidden))
        out["projected"].append(torch.einsum("bp,bpd->bd", weights, projected))
        out["pixels"].append(_crops(pixels, chunk))
    return {name: torch.cat(parts) for name, parts in out.items()}


def _crops(pixels: Tensor, samples: Sequence[VQASample]) -> Tensor:
    """(B, 3 * CROP * CROP) each sample's box, cropped and resized."""
    _, _, h, w = pixels.shape
    crops = []
    for image, sample in zip(pixels, samples, strict=True):
        x0, y0, x1, y1 = sample.region  # type: ignore[misc]
        top, left = int(y0 * h), int(x0 * w)
        bottom, right = max(int(y1 * h), top + 1), max(int(x1 * w), left + 1)
        crop = image[:, top:bottom, left:right][None]
        crops.append(F.interpolate(crop, size=(CROP, CROP), mode="bilinear")[0])
    return torch.stack(crops).flatten(1)


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int
) -> tuple[float, float]:
    """Train and test accuracy of an L2-regularised softmax regression (LBFGS)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(xs.shape[1], classes)
    optimizer = torch.optim.LBFGS(
        layer.parameters(), max_iter=300, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(xs), train_y) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = (layer(xs).argmax(1) == train_y).float().mean().item()
        test_acc = (layer(xt).argmax(1) == test_y).float().mean().item()
    return train_acc, test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    stream, engine = central_engine(args.overrides)
    engine.model.eval()
    stage = stream.stages[args.stage]
    split = {}
    for name, samples in (("train", stage.train), ("test", stage.test)):
        kept = [(s, labels) for s in samples if (labels := object_labels(s))]
        split[name] = (features(engine, [s for s, _ in kept]), [lab for _, lab in kept])
    result: dict = {
        "stage": stage.name,
        "overrides": args.overrides,
        "train": len(split["train"][1]),
        "test": len(split["test"][1]),
        "probes": {},
    }
    for target, vocabulary in (("shape", SHAPES), ("color", COLOR_NAMES)):
        k = 0 if target == "shape" else 1
        ys = {
            name: torch.tensor([vocabulary.index(lab[k]) for lab in labels])
            for name, (_, labels) in split.items()
        }
        majority = torch.bincount(ys["test"], minlength=len(vocabulary)).max().item()
        for depth in ("pixels", "vision", "projected"):
            train_acc, test_acc = linear_probe(
                split["train"][0][depth],
                ys["train"],
                split["test"][0][depth],
                ys["test"],
                len(vocabulary),
            )
            result["probes"][f"{target}/{depth}"] = {
                "train": train_acc,
                "test": test_acc,
                "chance": 1 / len(vocabulary),
                "majority": majority / len(ys["test"]),
            }
            print(f"{target:6s} {depth:9s} train {train_acc:.3f} test {test_acc:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
