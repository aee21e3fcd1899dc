"""How the training filter's flag rate moves with the timestep a threshold calibrated at t0 is applied at.

A ``memaudit calibrate`` threshold is a quantile of the first step's attention entropy (t0 = 981 for SD 1.x).
This applies such a threshold, made on the lab model's held-out ordinary captions at t0, to the same kind of
samples noised to other timesteps, as a training loop would score them at its batch's random timesteps
(docs/mitigation.md, "Training-time mitigation": why ``MemorizationFilter.from_calibration`` scores at t0).

    python benchmarks/filter_timesteps.py [--samples 400] [--fpr 0.05] [--seed 0]

Data: ``--samples`` held-out ordinary (scene, caption) pairs of the lab (``audit.lab.data.fresh_pairs``, the
stream the lab's training arm calibrates on), rendered to images, one noise draw each; the model: the bundled lab
model (its encoder mask passed, as in its training). The threshold is the ``1 - fpr`` quantile of the first half's
entropies at t0; the flag rates are over all samples. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> dict:
    """Run the measurement and print (and return) its JSON."""
    import torch

    from audit.lab import LAB_MODEL_DIR
    from audit.lab.data import STREAM_FILTER_CALIBRATION, DataConfig, fresh_pairs, render
    from audit.lab.train import _train_scheduler, encode
    from audit.mitigation.training import MemorizationFilter
    from audit.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = load_model(str(LAB_MODEL_DIR), device="cpu", dtype="float32")
    scenes, caps = fresh_pairs(DataConfig(), args.samples, STREAM_FILTER_CALIBRATION)
    cond, mask = encode(model.tokenizer, model.text_encoder, caps)
    x0 = torch.from_numpy(render(scenes)).float()
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=g)
    sched = _train_scheduler()
    filt = MemorizationFilter(float("inf"), layers=list(model.default_layers))

    def entropy(t: torch.Tensor) -> torch.Tensor:
        xt = sched.add_noise(x0, noise, t)
        return torch.cat([filt.attention_entropy(model.unet, cond[i:i + 100], xt[i:i + 100], t[i:i + 100],
                                                 mask[i:i + 100]) for i in range(0, len(x0), 100)])

    n = len(x0)
    at_t0 = entropy(torch.full((n,), 981))
    threshold = float(torch.quantile(at_t0[: n // 2], 1 - args.fpr))
    rates = {"981": float((at_t0 > threshold).double().mean())}
    for t in (700, 300, 10):
        rates[str(t)] = float((entropy(torch.full((n,), t)) > threshold).double().mean())
    rates["uniform random"] = float((entropy(torch.randint(0, 1000, (n,), generator=g)) > threshold).double().mean())
    out = {"model": str(LAB_MODEL_DIR), "layers": list(model.default_layers), "samples": n, "fpr": args.fpr,
           "threshold": threshold, "flag_rate_by_timestep": rates}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
